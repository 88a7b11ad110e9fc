"""The numba kernels against torch: rotary embedding, cache write and attention, row by row; norms; 8-bit rows;
the dot kernels compiled for an image's AVX2 CPU."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.backends import projections
from shared.backends.kernels import (
    KEY_BLOCK,
    add_rms_norm,
    attention,
    dot_kernels,
    gated,
    quantize_inputs,
    quantize_rows,
    rms_norm,
    seed_cache,
)
from shared.backends.llama_config import Kind

HEADS, KV_HEADS, DIM, SLOTS, MAX_LEN = 9, 3, 64, 6, 64
GROUP = HEADS // KV_HEADS


def blocked(keys: torch.Tensor) -> np.ndarray:
    """Keys (S, K, P, D) as the kernel keeps them: float16 bits, each block of positions dimension by dimension."""
    s, k, p, d = keys.shape
    halves = keys.half().numpy().view(np.uint16).reshape(s, k, p // KEY_BLOCK, KEY_BLOCK, d)
    return np.ascontiguousarray(halves.transpose(0, 1, 2, 4, 3)).reshape(s, k, p, d)


def unblocked(keys: np.ndarray) -> torch.Tensor:
    """The kernel's keys back as (S, K, P, D) float32."""
    s, k, p, d = keys.shape
    halves = keys.view(np.float16).reshape(s, k, p // KEY_BLOCK, d, KEY_BLOCK).transpose(0, 1, 2, 4, 3)
    return torch.from_numpy(halves.reshape(s, k, p, d).astype(np.float32))


def half_bits(values: torch.Tensor) -> np.ndarray:
    return values.half().numpy().view(np.uint16).copy()


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half layout, the usual way: x * cos + (-x2, x1) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], -1) * signed_sin


def tables() -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
    angles = torch.outer(torch.arange(MAX_LEN, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], -1)
    half = DIM // 2
    return angles.cos(), torch.cat([-angles[:, :half].sin(), angles[:, half:].sin()], -1)


ATTENTION_SCRIPT = """
import sys
import numpy as np
from shared.backends.kernels import attention
found = dict(np.load(sys.argv[1]))
dim, group = (int(v) for v in found.pop("sizes"))
attention(dim, group)(*(found[name] for name in ("qkv", "cos", "sin", "slots", "positions", "k", "v", "out")),
    np.float32(dim**-0.5), 0)
np.savez(sys.argv[1], **found)
"""


@pytest.mark.parametrize("cpu", [None, "x86-64-v3"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(HEADS, KV_HEADS), (8, 2)])
def test_each_row_attends_over_its_own_positions_with_its_kv_heads(
    tmp_path: Path, cpu: str | None, heads: int, kv_heads: int
) -> None:
    """Five decode rows in slots 0-4, then a 4-token prompt chunk of slot 5 at positions 10-13; the cache in
    float16 (its keys in blocks of positions), attention in float32 over those values. For this CPU, and
    compiled for x86-64-v3 (an image's kernels; AVX2's 16 registers hold fewer of a block's sums at once), for
    SmolLM2's three query heads to a kv head and Gemma's four."""
    torch.manual_seed(0)
    cos, sin = tables()
    slots = np.array([0, 1, 2, 3, 4, 5, 5, 5, 5], dtype=np.int64)
    positions = np.array([0, 5, 40, 17, 63, 10, 11, 12, 13], dtype=np.int64)  # one row sees only itself
    rows = len(positions)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * DIM)
    want_k, want_v = torch.randn(2, SLOTS + 1, kv_heads, MAX_LEN, DIM).half().float().unbind(0)
    k_cache, v_cache = blocked(want_k), half_bits(want_v)
    out = torch.empty(rows, heads * DIM)
    arrays: dict[str, Any] = {"qkv": qkv.numpy(), "cos": cos.numpy(), "sin": sin.numpy(), "slots": slots}
    arrays |= {"positions": positions, "k": k_cache, "v": v_cache, "out": out.numpy()}
    if cpu is None:
        attention(DIM, heads // kv_heads)(*arrays.values(), np.float32(DIM**-0.5), 0)
    else:
        (tmp_path / "attention.py").write_text(ATTENTION_SCRIPT)
        np.savez(tmp_path / "arrays.npz", **arrays, sizes=np.array([DIM, heads // kv_heads]))
        env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
        run = subprocess.run([sys.executable, str(tmp_path / "attention.py"), str(tmp_path / "arrays.npz")],
                             env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        found = np.load(tmp_path / "arrays.npz")
        k_cache, v_cache, out = found["k"], found["v"], torch.from_numpy(found["out"])

    for r, (slot, p) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        _, k, v = qkv[r].split([heads * DIM, kv_heads * DIM, kv_heads * DIM])
        want_k[slot, :, p] = rotate(k.view(kv_heads, DIM), cos[p], sin[p]).half().float()
        want_v[slot, :, p] = v.view(kv_heads, DIM).half().float()
    for r, (slot, p) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        q = rotate(qkv[r, : heads * DIM].view(heads, DIM), cos[p], sin[p])
        keys, values = want_k[slot, :, : p + 1], want_v[slot, :, : p + 1]  # (K, P, D): the chunk's earlier rows too
        want = F.scaled_dot_product_attention(q.unsqueeze(1), keys, values, enable_gqa=True)  # (H, 1, D)
        torch.testing.assert_close(out[r], want.reshape(-1), atol=1e-5, rtol=1e-5)
    got_k = unblocked(k_cache)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=2**-10)  # written at each row's position only
    assert np.array_equal(v_cache, half_bits(want_v))
    assert torch.equal(got_k[SLOTS:, :, 14:], want_k[SLOTS:, :, 14:])  # past the chunk, untouched


def test_a_cache_value_past_float16s_range_is_clamped_to_it() -> None:
    """A value beyond +-65504 is stored as the largest finite float16, never as an infinity (which would make
    every later score of that sequence NaN)."""
    cos, sin = tables()
    qkv = torch.zeros(1, (HEADS + 2 * KV_HEADS) * DIM)
    qkv[0, HEADS * DIM] = 1e6  # key 0, dimension 0 (position 0: no rotation)
    qkv[0, (HEADS + KV_HEADS) * DIM + 1] = -1e6  # value 0, dimension 1
    k, v = np.zeros((2, 1, KV_HEADS, MAX_LEN, DIM), np.uint16)
    out = np.empty((1, HEADS * DIM), np.float32)

    attention(DIM, GROUP)(qkv.numpy(), cos.numpy(), sin.numpy(), np.array([0]), np.array([0]), k, v, out, 1.0, 0)

    assert unblocked(k)[0, 0, 0, 0] == 65504.0
    assert v.view(np.float16)[0, 0, 0, 1] == -65504.0
    assert np.isfinite(out).all() and out[0, 1] == -65504.0  # one position: its value, weight 1


@pytest.mark.parametrize("top", [127, 63])
def test_rows_quantize_to_8_bits_each_with_its_own_scale(top: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 96)).astype(np.float32) * np.array([[1], [10], [0.01], [3], [0]], dtype=np.float32)
    q, s = quantize_rows(x, top)
    assert q.dtype == np.uint8 and s.shape == (5, 1)
    values = q.astype(np.int32) - (top + 1)
    np.testing.assert_allclose(s[:4, 0], np.abs(x[:4]).max(axis=1) / top, rtol=1e-6)
    assert (np.abs(values[:4]).max(axis=1) == top).all()  # each row uses the whole range
    assert (np.abs(values * s - x) <= s * 0.5001).all()  # within half a step of its own row's scale
    assert (values[4] == 0).all()  # a row of zeros stays zeros (no division by zero)


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


def test_rms_norm_matches_torch() -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(7, 576) * 3, torch.rand(576) + 0.5
    got = rms_norm(x.numpy(), weight.numpy(), np.float32(1e-5))
    torch.testing.assert_close(torch.from_numpy(got), F.rms_norm(x, (576,), weight, 1e-5), atol=1e-5, rtol=1e-5)


def test_a_blocks_output_joins_the_residual_stream_and_the_sum_is_normed_as_rms_norm_does() -> None:
    """The runner's residual add and the next norm in one call: the same bits as numpy's add and rms_norm."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 5, 576), dtype=np.float32) * 3
    weight = rng.random(576, dtype=np.float32) + 0.5
    total, normed = add_rms_norm(x, y, weight, np.float32(1e-5))
    np.testing.assert_array_equal(total, x + y)
    np.testing.assert_array_equal(normed, rms_norm(x + y, weight, np.float32(1e-5)))


@pytest.mark.parametrize("gelu", [False, True])
def test_the_gated_activation_is_silu_or_gemmas_gelu_times_up_within_float32s_rounding(gelu: bool) -> None:
    """act(gate) * up for every row, against float64 from -100 to 100 (e ** 100 overflows float32: no infinity
    or NaN): within 1e-6 of each value (float32 holds ~6e-8), or 1e-9 where GELU's far negative tail is smaller
    than float32 resolves its input."""
    torch.manual_seed(0)
    gate = torch.cat([torch.linspace(-100, 100, 20001), torch.randn(3999) * 4]).reshape(4, -1)
    up = torch.rand(4, 6000) + 0.5
    got = torch.from_numpy(gated(torch.cat([gate, up], 1).numpy(), gelu)).double()
    x = gate.double()
    act = F.gelu(x, approximate="tanh") if gelu else F.silu(x)
    want = act * up.double()
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


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
        "from shared.backends.kernels import attention\n"
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


@pytest.mark.skipif(platform.machine() != "x86_64", reason="CPUs without float16 conversions are x86's")
def test_a_cpu_without_float16_conversions_keeps_a_float32_cache(tmp_path: Path) -> None:
    """For x86's `generic` CPU (no F16C) LLVM would call conversion helpers numba cannot link, and the process
    would abort on its first step: there the float16 cache is refused, and the float32 one runs."""
    script = (
        "import numpy as np\n"
        "from shared.backends.kernels import attention, float16_native\n"
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
    script = "from shared.backends.kernels import dot_kernels, int4_dot_supported\n"
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
from shared.backends.kernels import dot_kernels, int4_dot_supported
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


AVX2_SCRIPT = """
import sys
import numpy as np
import torch
from shared.backends import projections
from shared.backends.llama_config import Kind
from shared.backends.kernels import dot_kernels
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
