"""The batched Llama runner on the embedded SmolLM2: what batching does and does not change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from shared.backends import Chunk, llama, projections
from shared.backends.cpu_runner import CpuRunner
from shared.backends.llama_config import LlamaConfig
from shared.backends.projections import Linear
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


def test_int4_a8_on_a_cpu_without_its_kernel_runs_int4_and_says_so(
    catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(projections, "DOT_KERNELS", None)
    monkeypatch.setattr(projections, "INT4_DOT", False)  # a CPU without AVX2 has no AVX-512 BF16 either
    caplog.set_level("WARNING")
    runner = smol(catalog, torch.bfloat16, "int4-a8", 1, 32)
    assert runner.quantization == "int4" and "running int4" in caplog.text
    qkv = [layer.qkv.linear for layer in runner.layers if isinstance(layer.qkv, llama.TorchProjection)]
    assert len(qkv) == len(runner.layers)
    assert all(isinstance(p, Linear) and p.quantization == "int4" and not p.dot for p in qkv)


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
