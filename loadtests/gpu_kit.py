"""What the CUDA checks (loadtests/gpu_check.sh) take to a GPU machine that has no network but a Python with a
CUDA build of torch (and transformers, numpy, numba): fnserve's other dependencies as wheels for that Python,
and the default model's shape without its weights.

    python -m loadtests.gpu_kit prepare [--out .gpu] [--python-version 3.12]   # here, with network
    python -m loadtests.gpu_kit model .gpu/smollm2 /tmp/smollm2-random        # there: random weights

The embedded model's weights (a 98 MB GGUF) are more than such a transfer may hold, so the sweep there serves a
checkpoint of SmolLM2's exact shape and tokenizer with random weights: the same arithmetic at every step, and
answers that mean nothing (the correctness checks run on tiny models against transformers).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Present wherever a CUDA build of torch is installed for the checks (or too large to carry): not downloaded.
PROVIDED = {
    "torch", "triton", "numpy", "numba", "llvmlite", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
    "filelock", "fsspec", "setuptools", "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pillow",
    "pyparsing", "python-dateutil", "six", "psutil", "pyyaml", "hf-xet",
}  # fmt: skip
EXTRAS = ("loadtest",)  # the sweep's Locust
TEST_PINS = ("pytest", "pytest-asyncio")  # from the dev extra: the CUDA tests
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")  # fmt: skip
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64", "linux_x86_64"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements() -> list[str]:
    """fnserve's pinned runtime dependencies, the sweep's and the tests', less what the GPU machine provides."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    wanted += [r for r in project["optional-dependencies"]["dev"] if _name(r) in TEST_PINS]
    return [r for r in wanted if _name(r) not in PROVIDED]


def _wheel_name(wheel: Path) -> str:
    return wheel.name.split("-", 1)[0].lower().replace("_", "-")


def prepare(out: Path, python_version: str) -> int:
    """Download the wheels (with their dependencies, for that Python on x86-64 Linux) and copy the default
    model's configuration and tokenizer."""
    from shared.settings import Settings
    from shared.sources import resolve_generation_model

    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels)]
    command += ["--python-version", python_version, "--implementation", "cp", *platforms, *requirements()]
    if subprocess.run(command).returncode:
        print("gpu_kit: pip download failed (above)", file=sys.stderr)
        return 1
    for wheel in wheels.glob("*.whl"):
        if _wheel_name(wheel) in PROVIDED or _wheel_name(wheel).startswith("nvidia-"):
            wheel.unlink()
    settings = Settings()
    default = next(m for m in settings.all_models if m.id == settings.default_model)
    source = resolve_generation_model(default, settings.cache_dir)
    shape = out / "smollm2"
    shape.mkdir(parents=True, exist_ok=True)
    for name in SHAPE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, shape / name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB")
    return 0


def random_model(shape: Path, target: Path) -> None:
    """A checkpoint of `shape`'s configuration with random weights in bfloat16, and its tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    for name in SHAPE_FILES:
        if name != "config.json" and (shape / name).is_file():
            shutil.copyfile(shape / name, target / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.gpu_kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    kit = commands.add_parser("prepare", help="download the wheels and copy the model's shape")
    kit.add_argument("--out", type=Path, default=ROOT / ".gpu")
    kit.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    model = commands.add_parser("model", help="a checkpoint of the shape with random weights")
    model.add_argument("shape", type=Path)
    model.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.out, args.python_version)
    random_model(args.shape, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
