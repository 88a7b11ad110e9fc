"""The attention kernel against torch: rotary embedding, cache write and attention, row by row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.backends.kernels.attention import KEY_BLOCK, attention

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
from shared.backends.kernels.attention import attention
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
