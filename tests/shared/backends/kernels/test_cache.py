"""The kernels' compiled code: an image's prebuilt copy seeded into numba's cache, a kernel cached for the next
process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

from shared.backends.kernels.cache import seed_cache


def test_prebuilt_kernels_are_copied_into_numbas_cache_without_replacing_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    prebuilt, cache = tmp_path / "image" / "kernels", tmp_path / "numba"
    (prebuilt / "backends_0a1b").mkdir(parents=True)
    (prebuilt / "backends_0a1b" / "kernels.rms_norm-1.py311.nbi").write_bytes(b"index")
    (prebuilt / "backends_0a1b" / "kernels.rms_norm-1.py311.1.nbc").write_bytes(b"code")
    (cache / "backends_0a1b").mkdir(parents=True)
    (cache / "backends_0a1b" / "kernels.rms_norm-1.py311.nbi").write_bytes(b"numba's own")

    monkeypatch.setattr(numba.config, "CACHE_DIR", "")  # numba caches beside the sources: nothing to seed
    seed_cache(prebuilt)
    assert not (cache / "backends_0a1b" / "kernels.rms_norm-1.py311.1.nbc").exists()

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(cache))
    seed_cache(prebuilt)
    assert (cache / "backends_0a1b" / "kernels.rms_norm-1.py311.1.nbc").read_bytes() == b"code"
    assert (cache / "backends_0a1b" / "kernels.rms_norm-1.py311.nbi").read_bytes() == b"numba's own"
    seed_cache(tmp_path / "nothing-prebuilt")  # an image without prebuilt kernels: nothing happens

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "a-file" / "numba"))
    (tmp_path / "a-file").write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        seed_cache(prebuilt)  # the kernels will compile as they would have: a warning, never an error
    assert "could not copy the prebuilt kernels" in caplog.text


def test_a_compiled_attention_kernel_is_loaded_by_the_next_process(tmp_path: Path) -> None:
    """numba keys a closure's cache entry by its captured values: the kernel must capture plain sizes only, or
    every start compiles it again (~5 s of a function's cold start here) and the cache grows by an entry."""
    script = (
        "import numpy as np\n"
        "from shared.backends.kernels.attention import attention\n"
        "k = np.zeros((1, 1, 32, 16), np.uint16)\n"
        "attention(16, 2, True)(np.zeros((1, 64), np.float32), np.ones((32, 16), np.float32),\n"
        "    np.zeros((32, 16), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64), k, k.copy(),\n"
        "    np.zeros((1, 32), np.float32), np.float32(0.25), 0)\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DEBUG_CACHE": "1"}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert "attention.locals.kernel" in runs[0] and "data saved" in runs[0]  # compiled, then cached
    assert "data loaded" in runs[1] and "data saved" not in runs[1]  # the next process loads it
