"""The matmuls' input quantization, and the dot kernels an image compiles for AVX2 CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.backends import projections
from shared.backends.kernels.isa import dot_kernels
from shared.backends.kernels.matmul import quantize_inputs
from shared.backends.llama_config import Kind


def test_groups_of_32_inputs_quantize_to_8_bits_each_with_its_own_step() -> None:
    """The 4-bit kernel's 8-bit inputs: every group of 32 inputs of a row uses the whole +-127 of its own step, each
    input within half a step, and each group's sum is its 8-bit inputs' times the step."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    x[1, 32:64] *= 100.0  # one loud group: its neighbours keep their own, finer steps
    x[2, 64:] = 0.0
    q, steps = quantize_inputs(x)
    assert q.dtype == np.int8 and steps.shape == (3, 3, 2)
    values = q.astype(np.int32).reshape(3, 3, 32)
    groups = x.reshape(3, 3, 32)
    np.testing.assert_allclose(steps[..., 0], np.abs(groups).max(-1) / 127, rtol=1e-6)
    assert steps[1, 1, 0] > 50 * max(steps[1, 0, 0], steps[1, 2, 0])
    live = steps[..., 0] > 0
    assert (np.abs(values).max(-1)[live] == 127).all()
    assert (np.abs(values * steps[..., :1] - groups) <= steps[..., :1] * 0.5001).all()
    np.testing.assert_allclose(steps[..., 1], values.sum(-1) * steps[..., 0], rtol=1e-6)
    assert (values[2, 2] == 0).all() and steps[2, 2, 1] == 0.0  # a group of zeros stays zeros


AVX2_SCRIPT = """
import sys
import numpy as np
import torch
from shared.backends import projections
from shared.backends.llama_config import Kind
from shared.backends.kernels.isa import dot_kernels
torch.manual_seed(0)
x = torch.randn(47, 576)
x[::3] *= 10
found = {"x": x.numpy()}
for kind, n in (("int4-a8", 3072), ("int4-a8", 48), ("int8-groups", 1024)):
    linear = projections.Linear(torch.randn(n, 576), torch.bfloat16, kind)
    assert linear.quantization == kind and linear.dot, (kind, linear.quantization)
    found[f"{kind}-{n}"] = linear(x).numpy()
    for start, stop in ((0, 1), (0, 16), (20, 21), (37, 38), (40, 47), (46, 47)):
        found[f"{kind}-{n}-{start}-{stop}"] = linear(x[start:stop]).numpy()
np.savez(sys.argv[1], **found)
print(dot_kernels())
"""


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(errors="replace"), reason="needs an AVX2 CPU")
def test_the_avx2_kernels_an_image_compiles_give_int4_a8_its_bits_and_the_head_finer_products(tmp_path: Path) -> None:
    """An image compiles the kernels for x86-64-v3 (AVX2 and FMA, no AVX-512). There int4-a8 sums its byte
    products by pmaddubsw and pmaddwd where AVX-512 VNNI has vpdpbusd: the same integers, so the same bits as the
    kernel of this process (where it is AVX-512's), alone or batched. The 8-bit head takes its inputs at 16 bits
    there: each row's product within 1e-4 of the exact one (bfloat16 inputs: ~2e-3), whatever its batch."""
    script = tmp_path / "avx2.py"
    script.write_text(AVX2_SCRIPT)
    env = {**os.environ, "NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "found.npz")], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["avx2"]
    found = np.load(tmp_path / "found.npz")
    x = torch.from_numpy(found["x"])
    torch.manual_seed(0)
    torch.randn(47, 576)  # x, as the script drew it
    kinds: list[tuple[Kind, int]] = [("int4-a8", 3072), ("int4-a8", 48), ("int8-groups", 1024)]
    for kind, n in kinds:
        weight = torch.randn(n, 576)
        got = found[f"{kind}-{n}"]
        for start, stop in ((0, 1), (0, 16), (20, 21), (37, 38), (40, 47), (46, 47)):
            np.testing.assert_array_equal(found[f"{kind}-{n}-{start}-{stop}"], got[start:stop])
        if kind == "int4-a8":
            inputs, steps = (torch.from_numpy(a).double() for a in quantize_inputs(x.numpy()))
            q, scale, low = (t.double() for t in projections.quantize_groups4(weight))
            scale, low = (t.half().double() for t in (scale, low))  # float16, as the plane keeps them
            products = torch.einsum("mgk,ngk->mng", inputs.reshape(47, -1, 32), q)  # (M, N, K/G)
            expected = (products * scale * steps[:, None, :, 0] + low * steps[:, None, :, 1]).sum(-1).numpy()
            assert np.abs(got - expected).max() < 1e-6 * np.abs(expected).max()
            if dot_kernels() == "avx512":
                np.testing.assert_array_equal(got, projections.Linear(weight, torch.bfloat16, kind)(x).numpy())
        else:
            q8, d = projections.quantize_groups8(weight)
            exact = (x.double() @ (q8.double() * d.double().unsqueeze(-1)).reshape(n, 576).T).numpy()
            assert np.abs(got - exact).max() < 1e-4 * np.abs(exact).max()
