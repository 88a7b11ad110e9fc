"""A projection's weight formats (shared.backends.projections): each kernel's products exact, whatever the batch."""

from __future__ import annotations

import threading

import pytest
import torch

from shared.backends.kernels.isa import dot_kernels, int4_dot_supported
from shared.backends.kernels.matmul import quantize_inputs, quantize_words
from shared.backends.kernels.rows import quantize_rows
from shared.backends.llama_config import Kind
from shared.backends.projections import (
    BFLOAT16_ONEDNN,
    FEW_ROWS,
    INT8_INPUT_TOP,
    Linear,
    dense_dtype,
    dense_linear,
    dense_stored,
    exact_groups4,
    quantize_groups4,
    quantize_groups8,
)


@pytest.mark.parametrize("rows", [1, 8, 16, 256])
def test_int8_matmuls_are_the_exact_integer_products(rows: int) -> None:
    """oneDNN's int8 matmul gives exactly the product of the 8-bit inputs and weights, times their scales: on a
    CPU without VNNI its pairs of products must not saturate 16 bits (weights at the full +-127 of every row;
    inputs spread over their whole range, and on odd rows under an outlier as real activations have)."""
    torch.manual_seed(0)
    weight = torch.randn(256, 576)
    linear = Linear(weight, torch.float32, "int8")
    x = torch.randn(rows, 576)
    x[1::2, 7] = -25.0
    got = linear(x)
    q, s = quantize_rows(x.numpy(), INT8_INPUT_TOP)
    inputs = torch.from_numpy(q).to(torch.int64) - (INT8_INPUT_TOP + 1)
    weights = (weight / linear.scale[:, None]).round().to(torch.int64)
    exact = (inputs @ weights.T).double() * linear.scale.double() * torch.from_numpy(s).double()
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not int4_dot_supported(), reason="the dot-product kernels need AVX-512 BF16")
@pytest.mark.parametrize("out_features", [3072, 48])
def test_the_dot_kernel_gives_each_row_its_exact_product_whatever_its_batch(out_features: int) -> None:
    """int4's bfloat16 dot-product kernel: each row's product with the 4-bit weights as exact as float32 (its
    inputs rounded to bfloat16, as torch's kernel takes them, whose bfloat16 output is 100x further off), and
    the same bits alone, among 16 rows, and in a 47-row prompt chunk (its last rows in smaller tiles)."""
    kind: Kind = "int4"
    torch.manual_seed(0)
    weight = torch.randn(out_features, 576)
    dot = Linear(weight, torch.bfloat16, kind, dot=True)
    q, _, _ = quantize_groups4(weight)
    sz = dot.planes[0][2].double().transpose(1, 2).reshape(out_features, -1, 2)  # (N, K/G, 2) from blocks of 16
    # w = (q - 8) * scale + zero, scale and zero as the kernel reads them
    exact_weight = (q.double() - 8) * sz[:, :, :1] + sz[:, :, 1:]
    x = torch.randn(47, 576)
    x[::3] *= 10
    exact = x.to(torch.bfloat16).double() @ exact_weight.reshape(out_features, 576).T
    got = dot(x)
    torch_kernel = Linear(weight, torch.bfloat16, kind, dot=False)(x)
    scale = exact.abs().max().item()
    assert got.dtype == torch.float32 and (got.double() - exact).abs().max().item() < 1e-6 * scale
    assert (torch_kernel.double() - exact).abs().max().item() > 100 * (got.double() - exact).abs().max().item()
    for start, stop in ((0, 1), (0, 16), (20, 21), (37, 38), (40, 47), (46, 47)):
        assert torch.equal(dot(x[start:stop]), got[start:stop])


@pytest.mark.skipif(dot_kernels() is None, reason="the 8-bit input kernel needs AVX2 or AVX-512 VNNI")
@pytest.mark.parametrize("out_features", [3072, 48])
def test_the_8_bit_input_kernel_gives_each_row_its_integer_product_whatever_its_batch(out_features: int) -> None:
    """int4-a8: each row's product is exactly that of its 8-bit inputs (float32 sums aside) with the 4-bit
    weights; within 0.8 % of the 4-bit weights' exact product for weights centred on zero as a model's are (the
    minimum's share taken from the exact inputs' sums was 1.1 % off: their rounding then meets the 0..15 values
    alone); and the same bits alone, among 16 rows, and in a 47-row prompt chunk."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, 576)
    linear = Linear(weight, torch.bfloat16, "int4-a8", dot=True)
    assert linear.quantization == "int4-a8"
    q, _, _ = quantize_groups4(weight)
    scales = linear.planes[0][2].double().permute(0, 3, 1, 2).reshape(out_features, -1, 2)  # (N, K/G, 2)
    x = torch.randn(47, 576)
    x[::3] *= 10
    inputs, steps = (torch.from_numpy(a).double() for a in quantize_inputs(x.numpy()))
    products = torch.einsum("mgk,ngk->mng", inputs.reshape(47, -1, 32), q.double())  # (M, N, K/G)
    expected = (products * scales[:, :, 0] * steps[:, None, :, 0] + scales[:, :, 1] * steps[:, None, :, 1]).sum(-1)
    got = linear(x)
    assert got.dtype == torch.float32 and linear.planes[0][2].dtype == torch.float16  # Q4_1's own float16s
    assert (got.double() - expected).abs().max().item() < 1e-6 * expected.abs().max().item()
    exact = x.double() @ (q.double() * scales[:, :, :1] + scales[:, :, 1:]).reshape(out_features, 576).T
    assert ((got.double() - exact).norm() / exact.norm()).item() < 0.008
    for start, stop in ((0, 1), (0, 16), (20, 21), (37, 38), (40, 47), (46, 47)):
        assert torch.equal(linear(x[start:stop]), got[start:stop])


def q4k_like(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) rounded as GGUF's Q4_K rounds it, de-quantised: each group of 32 is d * sc * q - dmin * m, q in
    0..15, sc and m 6-bit integers, d and dmin float16s per 256 inputs; a scale d * sc has up to 17 significant
    bits, which float16 would round. Every fourth group takes even q only (a step the values do not show)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // 256, 8, 32)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).amax(2, keepdim=True).div(63).half().float()
    dmin = (-lo).clamp(min=0).amax(2, keepdim=True).div(63).half().float().clamp(min=1e-4)
    sc, m = ((hi - lo) / 15 / d).round().clamp(1, 63), (-lo / dmin).round().clamp(0, 63)
    q = ((w + dmin * m) / (d * sc)).round().clamp(0, 15)
    q[:, :, ::4] = (q[:, :, ::4] / 2).floor() * 2
    return (d * sc * q - dmin * m).reshape(n, k)


def test_a_q4k_weight_is_found_as_its_own_4_bit_groups_and_nothing_else_is() -> None:
    torch.manual_seed(0)
    weight = q4k_like(torch.randn(48, 512))
    found = exact_groups4(weight)
    assert found is not None
    q, scale, low = found
    assert q.max() <= 15 and (q.float() * scale.unsqueeze(-1) + low.unsqueeze(-1)).reshape(48, 512).equal(weight)
    assert not scale.half().float().equal(scale)  # 17-bit scales: float16 would round them
    sixes = (torch.randint(0, 64, (48, 512)) - 32) * 0.01  # Q6_K's 64 levels in a group
    assert exact_groups4(sixes) is None and exact_groups4(torch.randn(48, 512)) is None
    assert exact_groups4(torch.randn(48, 500)) is None  # no groups of 32


@pytest.mark.skipif(dot_kernels() is None, reason="the 8-bit input kernel needs AVX2 or AVX-512 VNNI")
def test_a_q4k_weight_runs_the_8_bit_input_kernel_with_its_groups_scales_exactly() -> None:
    """int4-a8 on Q4_K's own groups: scales and lows kept in float32 (float16 rounds d * sc), so each row's
    product is that of its 8-bit inputs with the stored weights, float32 sums aside; the same alone as batched."""
    torch.manual_seed(0)
    weight = q4k_like(torch.randn(48, 512))
    groups = exact_groups4(weight)
    assert groups is not None
    linear = Linear(weight, torch.bfloat16, "int4-a8", groups4=groups)
    assert linear.dot_linear is not None and linear.planes[0][2].dtype == torch.float32
    q, scale, low = (t.double() for t in groups)
    x = torch.randn(17, 512)
    inputs, steps = (torch.from_numpy(a).double() for a in quantize_inputs(x.numpy()))
    products = torch.einsum("mgk,ngk->mng", inputs.reshape(17, -1, 32), q)  # (M, N, K/G)
    expected = (products * scale * steps[:, None, :, 0] + low * steps[:, None, :, 1]).sum(-1)
    got = linear(x)
    assert (got.double() - expected).abs().max().item() < 1e-6 * expected.abs().max().item()
    assert torch.equal(linear(x[3:4]), got[3:4])


@pytest.mark.skipif(dot_kernels() is None, reason="the 8-bit head's kernel needs AVX2 or AVX-512 VNNI")
def test_the_8_bit_head_gives_each_row_the_integer_product_of_its_16_bit_inputs_whatever_its_batch() -> None:
    """int8-groups (the output head): each row's product is exactly that of its inputs at 16 bits a group (float32
    sums aside) with the 8-bit weights; within 3e-5 of the exact float product (bfloat16 inputs were ~2e-3 off,
    torch's two int4 planes further); and the same bits alone, among 16 rows, and in a 47-row prompt chunk."""
    torch.manual_seed(0)
    weight = torch.randn(1024, 576)
    head = Linear(weight, torch.bfloat16, "int8-groups")
    assert head.dot and head.quantization == "int8-groups"
    q8, _ = quantize_groups8(weight)
    d = head.planes[0][2].double().transpose(1, 2).reshape(1024, -1, 1)  # float32, as the kernel reads it
    x = torch.randn(47, 576)
    x[::3] *= 10
    inputs, steps = (torch.from_numpy(a).double() for a in quantize_words(x.numpy()))
    products = torch.einsum("mgk,ngk->mng", inputs.reshape(47, -1, 32), q8.double())  # (M, N, K/G)
    expected = (products * d[:, :, 0] * steps[:, None, :]).sum(-1)
    got = head(x)
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() < 1e-6 * expected.abs().max().item()
    exact = x.double() @ (q8.double() * d).reshape(1024, 576).T
    assert (got.double() - exact).abs().max().item() < 3e-5 * exact.abs().max().item()
    torch_planes = Linear(weight, torch.bfloat16, "int8-groups", dot=False)(x)
    assert (torch_planes.double() - exact).abs().max().item() > 10 * (got.double() - exact).abs().max().item()
    for start, stop in ((0, 1), (0, 16), (20, 21), (37, 38), (40, 47), (46, 47)):
        assert torch.equal(head(x[start:stop]), got[start:stop])


def test_a_dense_row_skips_onednn_and_leaves_it_on_for_every_other_matmul() -> None:
    """One bfloat16 row goes to torch's vector kernel (the bits torch gives with oneDNN off), several rows to
    oneDNN; a model's one-row steps on another thread never switch it off under this thread's 16-row matmuls."""
    torch.manual_seed(0)
    weight = (torch.randn(4096, 640) * 0.05).to(torch.bfloat16)
    rows = torch.randn(16, 640).to(torch.bfloat16)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a property of the module
    try:
        vector_kernel = torch.nn.functional.linear(rows[:1], weight)
    finally:
        torch.backends.mkldnn.enabled = True  # type: ignore[assignment]  # a property of the module
    onednn = torch.nn.functional.linear(rows, weight)
    if torch.equal(vector_kernel, onednn[:1]):  # e.g. AVX2: torch multiplies bfloat16 without oneDNN there
        pytest.skip("torch runs bfloat16 matmuls without oneDNN on this CPU")

    assert torch.equal(dense_linear(rows[:1], weight), vector_kernel)
    assert torch.equal(dense_linear(rows, weight), onednn)
    assert torch.backends.mkldnn.enabled
    assert torch.allclose(vector_kernel.float(), onednn[:1].float(), rtol=0.02, atol=0.02)

    stop = threading.Event()

    def one_row_steps() -> None:
        while not stop.is_set():
            dense_linear(rows[:1], weight)

    other = threading.Thread(target=one_row_steps)
    other.start()
    try:
        seen = [torch.equal(dense_linear(rows, weight), onednn) for _ in range(300)]
    finally:
        stop.set()
        other.join()
    assert all(seen), f"{seen.count(False)} of 300 matmuls ran with oneDNN off"


def test_dense_projections_among_quantized_ones_are_float32_where_torch_has_no_bfloat16_onednn() -> None:
    """BFLOAT16_ONEDNN says what torch does: 16 bfloat16 rows come out of another kernel with oneDNN on than off
    exactly where it holds. Where it does not (AVX2), dense_dtype keeps bfloat16 weights in float32 on the CPU."""
    torch.manual_seed(0)
    weight = (torch.randn(1024, 640) * 0.05).to(torch.bfloat16)
    rows = torch.randn(16, 640).to(torch.bfloat16)
    onednn = torch.nn.functional.linear(rows, weight)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a property of the module
    try:
        fallback = torch.nn.functional.linear(rows, weight)
    finally:
        torch.backends.mkldnn.enabled = True  # type: ignore[assignment]  # a property of the module
    assert BFLOAT16_ONEDNN == (not torch.equal(onednn, fallback))
    cpu = torch.device("cpu")
    assert dense_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if BFLOAT16_ONEDNN else torch.float32)
    assert dense_dtype(torch.float32, cpu) == dense_dtype(torch.float32, torch.device("meta")) == torch.float32
    assert dense_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16  # another device: as asked


def test_a_dense_projection_among_quantized_ones_is_exact_float32_from_a_few_rows_where_bfloat16_is_slow() -> None:
    """Under auto, a dense projection of a bfloat16 model multiplies its float32 weight (the stored values exactly)
    from FEW_ROWS rows where torch has no bfloat16 oneDNN, and fewer rows its bfloat16 copy; elsewhere bfloat16.
    A weight packed in bfloat16 on another CPU is read back so too, and so is one whose shape int4 does not take."""
    torch.manual_seed(0)
    weight = torch.randn(640, 1024) * 0.05
    rows = torch.randn(16, 1024)
    few = rows[: FEW_ROWS - 1]
    linear = dense_stored(weight, torch.bfloat16, torch.device("cpu"))
    in_bfloat16 = dense_linear(rows.bfloat16(), weight.bfloat16())
    odd = Linear(weight[:, :1000], torch.bfloat16, "int4")  # no groups of 32: dense, among int4 projections
    assert odd.quantization == "none" and (odd.few_rows is None) == BFLOAT16_ONEDNN
    if BFLOAT16_ONEDNN:
        assert linear.few_rows is None and torch.equal(linear(rows), in_bfloat16)
        assert Linear.restore("none", torch.bfloat16, {"weight": weight.bfloat16()}).few_rows is None
        return
    assert torch.equal(linear.weight, weight) and linear.weight.data_ptr() % 64 == 0
    for x in (rows, rows[:FEW_ROWS]):
        assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight))
    assert not torch.equal(linear(rows), in_bfloat16)
    assert torch.equal(linear(few), dense_linear(few.bfloat16(), weight.bfloat16()))
    assert torch.equal(linear(rows[:1]), dense_linear(rows[:1].bfloat16(), weight.bfloat16()))
    # packed in bfloat16 on a CPU with bfloat16 oneDNN (an image's build host), read back on this one
    restored = Linear.restore("none", torch.bfloat16, {"weight": weight.bfloat16()})
    assert torch.equal(restored(rows), torch.nn.functional.linear(rows, weight.bfloat16().float()))
    assert torch.equal(restored(few), dense_linear(few.bfloat16(), weight.bfloat16()))


def test_a_float32_dense_weight_gives_the_same_one_row_products_wherever_it_was_read_from() -> None:
    """torch's one-row float32 matmul sums in another order at another alignment; a dense projection's weight,
    from the checkpoint or the packed file (any multiple of 8 bytes), multiplies as the first start's did."""
    torch.manual_seed(0)
    weight = torch.randn(640, 1024) * 0.05
    x = torch.randn(1, 1024)
    cpu = torch.device("cpu")
    first = dense_stored(weight, torch.float32, cpu)(x)
    for offset in range(16):  # in 4-byte elements
        at = torch.empty(weight.numel() + 16)[offset : offset + weight.numel()].view_as(weight)
        at.copy_(weight)
        assert torch.equal(dense_stored(at, torch.float32, cpu)(x), first)
        assert torch.equal(Linear.restore("none", torch.float32, {"weight": at})(x), first)
