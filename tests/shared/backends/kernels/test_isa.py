"""What the CPU numba compiles for runs: float16 conversions, the dot kernels' instructions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.backends import projections
from shared.backends.llama_config import Kind


@pytest.mark.skipif(platform.machine() != "x86_64", reason="CPUs without float16 conversions are x86's")
def test_a_cpu_without_float16_conversions_keeps_a_float32_cache(tmp_path: Path) -> None:
    """For x86's `generic` CPU (no F16C) LLVM would call conversion helpers numba cannot link, and the process
    would abort on its first step: there the float16 cache is refused, and the float32 one runs."""
    script = (
        "import numpy as np\n"
        "from shared.backends.kernels.attention import attention\n"
        "from shared.backends.kernels.isa import float16_native\n"
        "half = float16_native()\n"
        "k = np.zeros((1, 1, 32, 16), np.uint16 if half else np.float32)\n"
        "out = np.zeros((1, 32), np.float32)\n"
        "attention(16, 2, half)(np.ones((1, 64), np.float32), np.ones((32, 16), np.float32),\n"
        "    np.zeros((32, 16), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64), k, k.copy(), out,\n"
        "    np.float32(0.25), 0)\n"
        "print(half, out[0, 0])\n"
    )
    for cpu, native in (("generic", False), ("x86-64-v3", True)):
        env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CACHE_DIR": str(tmp_path / cpu)}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == [str(native), "1.0"]  # one position: its value


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the CPU names are x86's")
def test_the_dot_kernels_instructions_follow_the_cpu_numba_compiles_for() -> None:
    """An image names the CPU its kernels are compiled for: Cascade Lake and Ice Lake have AVX-512 BW and VNNI,
    as does x86-64-v4 with VNNI added (the image's 512-bit target), so the 512-bit kernels; Skylake-SP and
    x86-64-v4 have AVX-512 without VNNI, x86-64-v3 and Haswell AVX2 and FMA, so the AVX2 kernels; x86-64-v2 and
    `generic` have neither, so none (torch's kernels), where compiling AVX2's intrinsics would abort the process.
    int4's bfloat16 kernel is the host's alone."""
    script = "from shared.backends.kernels.isa import dot_kernels, int4_dot_supported\n"
    script += "print(dot_kernels(), int4_dot_supported())\n"
    expected = {
        ("cascadelake", ""): "avx512",
        ("icelake-server", ""): "avx512",
        ("x86-64-v4", "+avx512vnni"): "avx512",
        ("skylake-avx512", ""): "avx2",
        ("x86-64-v4", ""): "avx2",
        ("x86-64-v3", ""): "avx2",
        ("haswell", ""): "avx2",
        ("x86-64-v2", ""): "None",
        ("generic", ""): "None",
    }
    for (cpu, features), kernels in expected.items():
        env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == [kernels, "False"], cpu


VNNI_SCRIPT = """
import sys
import numpy as np
import torch
from shared.backends import projections
from shared.backends.kernels.isa import dot_kernels, int4_dot_supported
torch.manual_seed(0)
x = torch.randn(47, 576)
found = {}
for kind, n in (("int4-a8", 3072), ("int8-groups", 1024)):
    linear = projections.Linear(torch.randn(n, 576), torch.bfloat16, kind)
    assert linear.quantization == kind and linear.dot, (kind, linear.quantization)
    found[kind] = linear(x).numpy()
int4 = projections.Linear(torch.randn(64, 576), torch.bfloat16, "int4")
np.savez(sys.argv[1], **found)
print(dot_kernels(), int4_dot_supported(), int4.dot)
"""


@pytest.mark.skipif(
    not all(f in Path("/proc/cpuinfo").read_text(errors="replace") for f in ("avx512bw", "avx512_vnni")),
    reason="needs a CPU with AVX-512 BW and VNNI",
)
@pytest.mark.parametrize(
    ("cpu", "features"), [(None, "-avx512bf16"), ("cascadelake", ""), ("x86-64-v4", "+avx512vnni")]
)
def test_a_cpu_with_avx512_vnni_but_not_bf16_takes_the_512_bit_integer_kernels(
    tmp_path: Path, cpu: str | None, features: str
) -> None:
    """Cascade Lake and Ice Lake have AVX-512 VNNI but not BF16: as this host less BF16, and as CPUs an image
    names (Cascade Lake, and x86-64-v4 with VNNI: the image's 512-bit target; their instructions are a subset of
    this CPU's). int4-a8 and the 8-bit head need VNNI alone,
    so they take the 512-bit kernels: this process's bits. int4's bfloat16 kernel needs BF16, so int4 takes
    torch's kernel (compiling BF16's intrinsic would abort)."""
    script = tmp_path / "vnni.py"
    script.write_text(VNNI_SCRIPT)
    env = {**os.environ, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("NUMBA_CPU_NAME", None)
    if cpu:
        env["NUMBA_CPU_NAME"] = cpu
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "found.npz")], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["avx512", "False", "False"]
    found = np.load(tmp_path / "found.npz")
    torch.manual_seed(0)
    x = torch.randn(47, 576)
    kinds: list[tuple[Kind, int]] = [("int4-a8", 3072), ("int8-groups", 1024)]
    for kind, n in kinds:
        here = projections.Linear(torch.randn(n, 576), torch.bfloat16, kind)(x).numpy()
        np.testing.assert_array_equal(found[kind], here)
