"""The CPU runner: a start over packed weights runs without torch, and computes what a torch-prepared one does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from shared.backends import select_backend
from shared.backends.cpu_runner import CpuRunner
from shared.catalog import ModelCatalog
from shared.settings import Settings
from tests.shared.backends.test_conformance import model_dir

PROMPT = [1, 504, 3459, 282, 4649, 314]


def test_a_start_over_packed_weights_imports_no_torch_and_gives_the_same_logits(
    catalog: ModelCatalog, tmp_path: Path
) -> None:
    """The first start reads SmolLM2's checkpoint through torch, packs it and keeps it; the next, a new process
    as a function's start is, maps the packed file into the CPU runner without importing torch (~1.5 s and
    ~175 MB of its cold start) and computes the same logits, bit for bit, prefill and decode."""
    path = model_dir(catalog)
    settings = {"backend": "auto", "cache_dir": tmp_path, "max_model_len": 64, "max_running": 2}
    first = select_backend(Settings(**settings)).load(path)  # type: ignore[arg-type]
    assert isinstance(first, CpuRunner)
    want = np.stack([first.prefill(1, PROMPT, 0), *first.decode([28, 46], [6, 0])])
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from shared.backends import select_backend\n"
        "from shared.settings import Settings\n"
        f"runner = select_backend(Settings(**{settings!r})).load(Path({str(path)!r}))\n"
        f"got = np.stack([runner.prefill(1, {PROMPT}, 0), *runner.decode([28, 46], [6, 0])])\n"
        f"np.save({str(tmp_path / 'got.npy')!r}, got)\n"
        "print(type(runner).__name__, runner.quantization, 'torch' in sys.modules)\n"
    ).replace("PosixPath(", "Path(")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.split() == ["CpuRunner", first.quantization, "False"]
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), want)
