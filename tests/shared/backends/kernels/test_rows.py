"""The row kernels against torch: RMSNorm, the residual add with its norm, the gated activation, 8-bit rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.backends.kernels.rows import add_rms_norm, gated, quantize_rows, rms_norm


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
