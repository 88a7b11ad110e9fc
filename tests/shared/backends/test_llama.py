"""The batched Llama runner on the embedded SmolLM2: what batching does and does not change."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from shared.backends import Chunk, llama
from shared.backends.cpu_runner import CpuRunner
from shared.backends.kernels import dot_kernels, int4_dot_supported, quantize_inputs, quantize_rows, quantize_words
from shared.backends.llama import (
    INT8_INPUT_TOP,
    Kind,
    Linear,
    dense_linear,
    quantize_groups4,
    quantize_groups8,
)
from shared.backends.llama_config import LlamaConfig
from shared.catalog import ModelCatalog
from shared.settings import Quantization
from tests.shared.backends.test_conformance import model_dir


def smol(
    catalog: ModelCatalog,
    dtype: torch.dtype,
    quantization: Quantization,
    slots: int,
    max_len: int,
    packed_dir: Path | None = None,
) -> CpuRunner:
    """The batched runner on the embedded SmolLM2, as the CPU runs it."""
    path = model_dir(catalog)
    config = LlamaConfig.from_dir(path)
    assert config is not None
    runner = llama.runner(
        path,
        config,
        dtype=dtype,
        quantization=quantization,
        slots=slots,
        max_len=max_len,
        packed_dir=packed_dir,
    )
    assert isinstance(runner, CpuRunner)
    return runner


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_logits_of_a_row_do_not_depend_on_its_batch(
    catalog: ModelCatalog, quantization: Literal["int4", "int8"]
) -> None:
    """int4 and int8 decode a sequence to the same bits alone and as one of 16 rows of different lengths."""
    runner = smol(catalog, torch.bfloat16, quantization, 17, 256)
    lengths = [20 + 7 * i for i in range(16)]
    for slot, length in enumerate(lengths):
        runner.prefill(slot, list(range(100 + slot, 100 + slot + length)), 0)
    tokens = [7 + i for i in range(16)]
    batched = runner.decode(tokens, lengths)

    runner.move_slot(5, 0, lengths[5])  # sequence 5, alone in slot 0 (its prefix; the batch step's write is redone)
    alone = runner.decode([tokens[5]], [lengths[5]])

    assert np.array_equal(alone[0], batched[5])
    assert not np.array_equal(batched[5], batched[4])  # the rows are different sequences


def test_a_prompt_chunk_riding_along_a_decode_step_changes_nothing(catalog: ModelCatalog) -> None:
    """int8: one pass with 4 decode rows and a 30-token chunk gives the bits of the two passes apart."""
    runner = smol(catalog, torch.float32, "int8", 6, 256)
    lengths = [12, 40, 25, 33]
    for slot, length in enumerate(lengths):
        runner.prefill(slot, list(range(200 + slot, 200 + slot + length)), 0)
    tokens, prompt = [11, 12, 13, 14], list(range(300, 330))

    decoded, chunk_logits = runner.step(tokens, lengths, Chunk(4, prompt, 0))
    apart_chunk = runner.prefill(5, prompt, 0)
    apart_decoded = runner.decode(tokens, lengths)  # rewrites the same cache entries with the same values

    assert chunk_logits is not None
    assert np.array_equal(decoded, apart_decoded)
    assert np.array_equal(chunk_logits, apart_chunk)
    # The chunk filled slot 4's cache as the prefill apart filled slot 5: both continue alike.
    token = int(np.argmax(chunk_logits))
    after = runner.decode([*tokens, token, token], [n + 1 for n in lengths] + [len(prompt)] * 2)
    assert np.array_equal(after[4], after[5])


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
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() < 1e-6 * expected.abs().max().item()
    exact = x.double() @ (q.double() * scales[:, :, :1] + scales[:, :, 1:]).reshape(out_features, 576).T
    assert ((got.double() - exact).norm() / exact.norm()).item() < 0.008
    for start, stop in ((0, 1), (0, 16), (20, 21), (37, 38), (40, 47), (46, 47)):
        assert torch.equal(linear(x[start:stop]), got[start:stop])


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


def test_int4_a8_on_a_cpu_without_its_kernel_runs_int4_and_says_so(
    catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(llama, "DOT_KERNELS", None)
    monkeypatch.setattr(llama, "INT4_DOT", False)  # a CPU without AVX2 has no AVX-512 BF16 either
    caplog.set_level("WARNING")
    runner = smol(catalog, torch.bfloat16, "int4-a8", 1, 32)
    assert runner.quantization == "int4" and "running int4" in caplog.text
    projections = [layer.qkv.linear for layer in runner.layers if isinstance(layer.qkv, llama.TorchProjection)]
    assert len(projections) == len(runner.layers)
    assert all(isinstance(p, Linear) and p.quantization == "int4" and not p.dot for p in projections)


def test_mixed_runs_int4_for_a_few_rows_and_int8_from_eight(catalog: ModelCatalog) -> None:
    """Over the same cache, mixed gives int4's bits for one decode row and int8's for a step of 16 rows."""
    lengths, tokens = [20 + 7 * i for i in range(16)], [7 + i for i in range(16)]
    runners = {q: smol(catalog, torch.bfloat16, q, 16, 256) for q in ("int4", "int8", "mixed")}
    for slot, length in enumerate(lengths):
        runners["int8"].prefill(slot, list(range(100 + slot, 100 + slot + length)), 0)
    cache = runners["int8"].kv_cache.copy()
    out = {}
    for q, runner in runners.items():
        runner.kv_cache[...] = cache
        one = runner.decode(tokens[:1], lengths[:1])
        runner.kv_cache[...] = cache
        out[q] = one, runner.decode(tokens, lengths)
    assert np.array_equal(out["mixed"][0], out["int4"][0])
    assert np.array_equal(out["mixed"][1], out["int8"][1])
    assert not np.array_equal(out["int4"][1], out["int8"][1])


def test_a_step_past_the_cache_is_refused(catalog: ModelCatalog) -> None:
    runner = smol(catalog, torch.float32, "none", 2, 64)
    with pytest.raises(ValueError, match="past the KV cache"):
        runner.decode([5], [64])
    with pytest.raises(ValueError, match="past the KV cache"):
        runner.prefill(1, list(range(10)), 60)


def _resident_bytes(address: int) -> int:
    """Resident memory of the mapping that holds this address, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the KV cache")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_the_kv_cache_takes_memory_only_for_positions_in_use(catalog: ModelCatalog) -> None:
    """32 slots of 2048 positions are 1.4 GiB of address space; one 100-token prompt makes a few MB of it resident."""
    runner = smol(catalog, torch.bfloat16, "int4", 32, 2048)
    runner.prefill(3, list(range(100, 200)), 0)
    cache = runner.kv_cache
    size = cache.nbytes
    resident = _resident_bytes(cache.ctypes.data)
    config = runner.config
    per_position = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # float16 keys and values
    assert size > 2**30
    assert 100 * per_position <= resident < 4 * 100 * per_position + (1 << 20)  # pages round each (layer, head) up
    assert np.abs(cache[:, :, 3, :, :100].astype(np.float32)).sum() > 0
    assert not cache[:, :, 3, :, 128:].any()  # past the prompt's block of keys the slot still reads as zeros


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_a_quantized_runner_keeps_no_float32_checkpoint_in_memory(catalog: ModelCatalog) -> None:
    """The checkpoint is memory-mapped while the weights are packed; nothing may keep it (540 MB for SmolLM2)."""
    import gc

    runner = smol(catalog, torch.bfloat16, "int4", 2, 64)
    gc.collect()
    checkpoint = str(model_dir(catalog) / "model.safetensors")
    assert not any(checkpoint in line for line in open("/proc/self/maps"))
    assert runner.decode([5], [0]).shape == (1, runner.config.vocab_size)


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
