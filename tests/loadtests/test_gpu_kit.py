"""The kit the CUDA checks take to a GPU machine without network: its wheels' list and the random-weight model."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch
from safetensors import safe_open

from loadtests import gpu_kit
from shared.backends.llama_config import LlamaConfig


def test_the_kit_pins_what_fnserve_and_the_sweep_need_but_not_what_a_cuda_python_has() -> None:
    wanted = gpu_kit.requirements()
    project = tomllib.loads((gpu_kit.ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["dependencies"]) - {r for r in project["dependencies"] if r.startswith("numpy")} <= set(wanted)
    assert any(r.startswith("locust==") for r in wanted) and any(r.startswith("pytest==") for r in wanted)
    assert not any(gpu_kit._name(r) in gpu_kit.PROVIDED for r in wanted)  # torch, numpy, numba: the machine's
    assert all("==" in r for r in wanted)  # pinned as shipped


def test_the_random_model_has_the_shape_and_tokenizer_it_was_given(tmp_path: Path) -> None:
    shape, target = tmp_path / "shape", tmp_path / "model"
    shape.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": True}  # fmt: skip
    (shape / "config.json").write_text(json.dumps(config))
    (shape / "tokenizer.json").write_text('{"version": "1.0"}')
    gpu_kit.random_model(shape, target)
    found = LlamaConfig.from_dir(target)
    assert found is not None and (found.num_layers, found.hidden_size) == (2, 32)
    assert (target / "tokenizer.json").read_text() == '{"version": "1.0"}'
    with safe_open(str(target / "model.safetensors"), "pt") as weights:
        tensor = weights.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (32, 64) and tensor.float().std() > 0
