"""Fetch the chat page's browser libraries from npm, pinned, into static/vendor/ (committed: users build nothing).

    python -m shared.ui.vendor          # needs npm and the npm registry; run when a pin changes

Each package is `npm pack`ed at its pinned version; npm's integrity (sha512) of the tarball, the sha256 of
every file taken from it, and its licence files are recorded in static/vendor/VERSIONS.json (a test checks the
files against it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).parent / "static" / "vendor"
# package -> (version, files taken from the package, relative to its root)
PINS = {
    "marked": ("18.2.1", ["lib/marked.umd.js"]),
    "dompurify": ("3.5.0", ["dist/purify.min.js"]),
    "@highlightjs/cdn-assets": ("11.11.1", ["highlight.min.js", "styles/github.min.css", "styles/github-dark.min.css"]),
}
LICENCES = ("LICENSE", "LICENSE-MPL", "LICENSE.md")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    record: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as work:
        for package, (version, files) in PINS.items():
            packed = subprocess.run(
                ["npm", "pack", f"{package}@{version}", "--json"], cwd=work, check=True, capture_output=True, text=True
            )
            info = json.loads(packed.stdout)[0]
            with tarfile.open(Path(work) / info["filename"]) as tar:
                tar.extractall(Path(work) / package, filter="data")
            root = Path(work) / package / "package"
            target = VENDOR / package.split("/")[-1]
            shutil.rmtree(target, ignore_errors=True)
            taken = {}
            for name in [*files, *(n for n in LICENCES if (root / n).is_file())]:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / name, target / name)
                taken[name] = sha256(target / name)
            record[package] = {"version": version, "integrity": info["integrity"], "files": taken}
    (VENDOR / "VERSIONS.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
