"""The decode kernel against torch: rotary embedding, cache write and attention, row by row."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shared.backends.kernels import decode_attention, quantize_rows, rms_norm
from shared.backends.llama import rotate

HEADS, KV_HEADS, DIM, SLOTS, MAX_LEN = 9, 3, 64, 6, 64


def tables() -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
    angles = torch.outer(torch.arange(MAX_LEN, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], -1)
    half = DIM // 2
    return angles.cos(), torch.cat([-angles[:, :half].sin(), angles[:, half:].sin()], -1)


def test_each_row_attends_over_its_own_positions_with_its_kv_heads() -> None:
    torch.manual_seed(0)
    cos, sin = tables()
    positions = np.array([0, 5, 40, 17, 63], dtype=np.int64)  # one row sees only itself; one fills the cache
    rows = len(positions)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * DIM)
    k_cache, v_cache = torch.randn(2, SLOTS, KV_HEADS, MAX_LEN, DIM).unbind(0)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    out = torch.empty(rows, HEADS * DIM)

    decode_attention(
        qkv.numpy(),
        cos.numpy(),
        sin.numpy(),
        positions,
        k_cache.numpy(),
        v_cache.numpy(),
        out.numpy(),
        np.float32(DIM**-0.5),
    )

    for b, p in enumerate(positions.tolist()):
        q, k, v = qkv[b].split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM])
        q = rotate(q.view(HEADS, DIM), cos[p], sin[p])
        want_k[b, :, p] = rotate(k.view(KV_HEADS, DIM), cos[p], sin[p])
        want_v[b, :, p] = v.view(KV_HEADS, DIM)
        keys, values = want_k[b, :, : p + 1], want_v[b, :, : p + 1]  # (K, P, D)
        want = F.scaled_dot_product_attention(q.unsqueeze(1), keys, values, enable_gqa=True)  # (H, 1, D)
        torch.testing.assert_close(out[b], want.reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, want_k, atol=1e-6, rtol=1e-6)  # written at each row's position only
    assert torch.equal(v_cache, want_v)
    assert torch.equal(k_cache[rows:], want_k[rows:])  # slots past the batch are untouched


def test_rows_quantize_to_8_bits_each_with_its_own_scale() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 96)).astype(np.float32) * np.array([[1], [10], [0.01], [3], [0]], dtype=np.float32)
    q, s = quantize_rows(x)
    assert q.dtype == np.uint8 and s.shape == (5, 1)
    values = q.astype(np.int32) - 128
    np.testing.assert_allclose(s[:4, 0], np.abs(x[:4]).max(axis=1) / 127, rtol=1e-6)
    assert (np.abs(values[:4]).max(axis=1) == 127).all()  # each row uses the whole range
    assert (np.abs(values * s - x) <= s * 0.5001).all()  # within half a step of its own row's scale
    assert (values[4] == 0).all()  # a row of zeros stays zeros (no division by zero)


def test_rms_norm_matches_torch() -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(7, 576) * 3, torch.rand(576) + 0.5
    got = rms_norm(x.numpy(), weight.numpy(), np.float32(1e-5))
    torch.testing.assert_close(torch.from_numpy(got), F.rms_norm(x, (576,), weight, 1e-5), atol=1e-5, rtol=1e-5)
