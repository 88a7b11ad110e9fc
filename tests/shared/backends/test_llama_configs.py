"""Checkpoints the batched runner implements run through it and match transformers: Llama (with or without
attention and MLP biases), Mistral (its sliding window caps the context), Qwen2 (q/k/v biases), Qwen3 (q/k
norms), Gemma 3 (per-layer sliding windows and rotary bases, q/k norms, output norms, the scaled embedding).
Those with what it does not implement (another activation, rope scaling, another architecture) go to
transformers' own model. Tiny models, randomly initialised from a config made here (no weights to download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from shared.backends import Chunk, llama
from shared.backends.llama_config import LlamaConfig
from shared.backends.projections import Linear
from shared.backends.torch_backend import TorchRunner, create
from shared.settings import Settings

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
TOKENS = [5, 17, 3, 88, 42, 9, 61, 23, 7, 50]
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
# the numba kernels (the CPU's default) and the torch path on any device, against transformers' CPU logits
PATHS = [("numba", "cpu"), ("torch", "cpu"), pytest.param("torch", "cuda", marks=CUDA)]


def tiny_model(path: Path, model_type: str = "llama", **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # biases start at zero, q/k norms at one: make them count
            if name.endswith(".bias") or name.endswith(("q_norm.weight", "k_norm.weight")):
                torch.nn.init.normal_(param, mean=float(name.endswith("weight")), std=0.5)
    model.save_pretrained(path)
    return model


def reference(model: PreTrainedModel, tokens: list[int] = TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float().numpy()


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("mistral", {"sliding_window": 16}),
        ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1_000_000.0}),
        ("qwen3", {"head_dim": 8, "attention_bias": True}),
    ],
    ids=["llama", "llama-biases", "mistral", "qwen2", "qwen3"],
)
@pytest.mark.parametrize(("kernels", "device"), PATHS)
def test_an_implemented_checkpoint_runs_batched_and_matches_transformers(
    tmp_path: Path, model_type: str, overrides: dict[str, Any], kernels: Literal["numba", "torch"], device: str
) -> None:
    """Through the numba kernels (the CPU's default) and the torch path (what CUDA runs), on the CPU and CUDA."""
    model = tiny_model(tmp_path, model_type, **overrides)
    config = LlamaConfig.from_dir(tmp_path)
    assert config is not None
    runner = llama.runner(
        tmp_path, config, dtype=torch.float32, quantization="none", slots=2, max_len=64, kernels=kernels, device=device
    )
    runner.prefill(0, TOKENS[:-1], 0)
    logits = runner.decode([TOKENS[-1]], [len(TOKENS) - 1])[0]
    assert np.allclose(logits, reference(model), atol=1e-4)
    if "sliding_window" in overrides:
        assert runner.context_length == 16  # never past the window: within it, attention is full


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {"hidden_act": "gelu"}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("qwen3", {"head_dim": 8, "hidden_act": "gelu"}),
        ("gemma3_text", {"head_dim": 8, "final_logit_softcapping": 30.0}),
        ("gemma3_text", {"head_dim": 8, "hidden_activation": "gelu"}),
    ],
    ids=["gelu", "rope_scaling", "qwen3-gelu", "gemma3-softcapping", "gemma3-gelu"],
)
def test_what_the_runner_does_not_implement_goes_to_transformers(
    tmp_path: Path, model_type: str, overrides: dict[str, Any]
) -> None:
    """The runner used to ignore such fields (biases, the activation) and compute wrong logits without a word."""
    model = tiny_model(tmp_path, model_type, **overrides)
    assert LlamaConfig.from_dir(tmp_path) is None
    runner = create("cpu", Settings(preload=[])).load(tmp_path)
    assert isinstance(runner, TorchRunner)
    logits = runner.forward(runner.new_cache(), TOKENS)
    assert np.allclose(np.asarray(logits), reference(model), atol=1e-5)


GEMMA = {
    "head_dim": 8,
    "query_pre_attn_scalar": 16,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    },
    "tie_word_embeddings": True,
}


@pytest.mark.parametrize(("kernels", "device"), PATHS)
def test_gemma3_runs_batched_and_matches_transformers(
    tmp_path: Path, kernels: Literal["numba", "torch"], device: str
) -> None:
    """10 tokens through a window of 4 on the sliding layer: every Gemma 3 part counts (norms made non-zero)."""
    model = tiny_model(tmp_path, "gemma3_text", **GEMMA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma stores w - 1: zeros would hide a missing offset
                torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(tmp_path)
    config = LlamaConfig.from_dir(tmp_path)
    assert config is not None and config.gemma and config.layer_windows == (4, None)
    runner = llama.runner(
        tmp_path, config, dtype=torch.float32, quantization="none", slots=2, max_len=64, kernels=kernels, device=device
    )
    runner.prefill(1, TOKENS[:3], 0)  # a prompt cut into two chunks, the second riding along a decode step
    runner.prefill(0, [7], 0)
    chunk = runner.step([8], [1], Chunk(1, TOKENS[3:-1], 3))[1]
    assert chunk is not None and np.allclose(chunk, reference(model, TOKENS[:-1]), atol=1e-4)
    logits = runner.decode([9, TOKENS[-1]], [2, len(TOKENS) - 1])[1]  # beside the other sequence's third token
    assert np.allclose(logits, reference(model), atol=1e-4)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("qwen3", {"head_dim": 8, "attention_bias": True}), ("gemma3_text", GEMMA)],
    ids=["llama", "qwen3", "gemma3"],
)
@pytest.mark.parametrize("graphs", [False, True], ids=["as-it-comes", "fixed-shape"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_torch_path_in_bfloat16_stays_near_transformers_float32(
    tmp_path: Path, model_type: str, overrides: dict[str, Any], graphs: bool, device: str
) -> None:
    """CUDA's default: weights, cache and matmul inputs in bfloat16 (the residual stream float32), with the decode
    step as it comes and as CUDA graphs replay it. Measured on the CPU: within 0.0022 of logits within 0.3."""
    model = tiny_model(tmp_path, model_type, **overrides)
    config = LlamaConfig.from_dir(tmp_path)
    assert config is not None
    runner = llama.LlamaRunner(
        tmp_path, config, dtype=torch.bfloat16, quantization="none", slots=2, max_len=64, device=device, graphs=graphs
    )
    assert runner.kv_cache.dtype == torch.bfloat16
    runner.prefill(0, TOKENS[:-1], 0)
    logits, want = runner.decode([TOKENS[-1]], [len(TOKENS) - 1])[0], reference(model)
    assert np.allclose(logits, want, atol=0.01) and np.argmax(logits) == np.argmax(want)


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_embedding_is_held_once_in_bfloat16(tmp_path: Path, tied: bool) -> None:
    """Gemma 3's tied table is 262k x 640: a second bfloat16 copy for the output head was 320 MB resident."""
    model = tiny_model(tmp_path, "gemma3_text", **{**GEMMA, "tie_word_embeddings": tied})
    config = LlamaConfig.from_dir(tmp_path)
    assert config is not None
    runner = llama.runner(tmp_path, config, dtype=torch.bfloat16, quantization="none", slots=2, max_len=64)
    assert isinstance(runner.embed, llama.TorchEmbedding) and isinstance(runner.lm_head, llama.TorchProjection)
    dense, head = runner.embed.embedding.dense, runner.lm_head.linear
    assert dense is not None and isinstance(head, Linear)
    shared = head.weight.untyped_storage().data_ptr() == dense.untyped_storage().data_ptr()
    assert shared is tied
    runner.prefill(0, TOKENS[:-1], 0)
    logits = runner.decode([TOKENS[-1]], [len(TOKENS) - 1])[0]
    assert np.allclose(logits, reference(model), atol=0.05)  # bfloat16 weights
