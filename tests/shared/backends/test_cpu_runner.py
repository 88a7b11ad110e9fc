"""The CPU runner: a start over packed weights runs without torch, and computes what a torch-prepared one does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.backends import select_backend
from shared.backends.cpu_runner import CpuRunner
from shared.catalog import ModelCatalog
from shared.settings import Settings
from tests.shared.backends.test_conformance import model_dir

PROMPT = [1, 504, 3459, 282, 4649, 314]


def start(settings: dict[str, object], path: Path, out: Path, env: dict[str, str] | None = None) -> list[str]:
    """A new process's start of the runner, as a function's: its logits of PROMPT's prefill and two decode rows
    saved to `out`; what it printed (its runner, quantization and whether torch was imported) returned."""
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from shared.backends import select_backend\n"
        "from shared.settings import Settings\n"
        f"runner = select_backend(Settings(**{settings!r})).load(Path({str(path)!r}))\n"
        f"got = np.stack([runner.prefill(1, {PROMPT}, 0), *runner.decode([28, 46], [6, 0])])\n"
        f"np.save({str(out)!r}, got)\n"
        "print(type(runner).__name__, runner.quantization, 'torch' in sys.modules)\n"
    ).replace("PosixPath(", "Path(")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


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
    assert start(settings, path, tmp_path / "got.npy") == ["CpuRunner", first.quantization, "False"]
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), want)


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(errors="replace"), reason="needs an AVX2 CPU")
def test_an_images_start_on_avx2_kernels_imports_no_torch_either(catalog: ModelCatalog, tmp_path: Path) -> None:
    """The CPU image compiles its kernels for x86-64-v3 (AVX2, no AVX-512): its build packs the weights for
    them (int4-a8 layers, the 8-bit head), and a function's start maps them without torch, as on this host,
    to the same logits as the build's process, and the same greedy tokens as this host's kernels. Not the same
    bits: its float sums run 8 lanes wide (attention, norms), and the 8-bit inputs of int4-a8 turn such
    differences into roundings (KL 0.004 here, a broken kernel's would be past 1)."""
    path = model_dir(catalog)
    settings = {"backend": "auto", "cache_dir": tmp_path, "max_model_len": 64, "max_running": 2}
    image = {"NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path / "kernels")}
    assert start(settings, path, tmp_path / "build.npy", image) == ["CpuRunner", "int4-a8", "True"]
    assert start(settings, path, tmp_path / "got.npy", image) == ["CpuRunner", "int4-a8", "False"]
    got = np.load(tmp_path / "got.npy")
    np.testing.assert_array_equal(got, np.load(tmp_path / "build.npy"))
    here = select_backend(Settings(**settings)).load(path)  # type: ignore[arg-type]
    assert isinstance(here, CpuRunner)
    want = np.stack([here.prefill(1, PROMPT, 0), *here.decode([28, 46], [6, 0])])
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert kl(want, got) < 0.02


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """The largest of the rows' KL divergences (nats) of softmax(q_logits) from softmax(p_logits)."""
    p, q = (x.astype(np.float64) - x.max(-1, keepdims=True) for x in (p_logits, q_logits))
    log_p, log_q = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (p, q))
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).max())
