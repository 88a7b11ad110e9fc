"""Checkpoints the batched runner implements run through it and match transformers; those with a field it does
not implement (biases, another activation, rope scaling, a sliding window) go to transformers' own model.
Tiny Llama models, randomly initialised from a config made here (no weights to download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from shared.backends.llama import LlamaConfig, LlamaRunner
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


def tiny_model(path: Path, **overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(HFLlamaConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(path)
    return model


def reference(model: LlamaForCausalLM) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0, -1].float().numpy()


def test_a_plain_llama_runs_batched_and_matches_transformers(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    config = LlamaConfig.from_dir(tmp_path)
    assert config is not None
    runner = LlamaRunner(tmp_path, config, dtype=torch.float32, quantization="none", slots=2, max_len=64)
    runner.prefill(0, TOKENS[:-1], 0)
    logits = runner.decode([TOKENS[-1]], [len(TOKENS) - 1])[0]
    assert np.allclose(logits, reference(model), atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_bias": True},
        {"mlp_bias": True},
        {"hidden_act": "gelu"},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ],
    ids=["attention_bias", "mlp_bias", "gelu", "rope_scaling"],
)
def test_a_field_the_runner_does_not_implement_goes_to_transformers(tmp_path: Path, overrides: dict[str, Any]) -> None:
    """The runner used to ignore these and compute wrong logits without a word."""
    model = tiny_model(tmp_path, **overrides)
    assert LlamaConfig.from_dir(tmp_path) is None
    runner = create("cpu", Settings(preload=[])).load(tmp_path)
    assert isinstance(runner, TorchRunner)
    cache = runner.new_cache()
    logits = runner.forward(cache, TOKENS)
    assert np.allclose(np.asarray(logits), reference(model), atol=1e-5)
