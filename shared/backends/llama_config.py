"""The Llama family as the batched runners read it: the config, and the weights' structure (no framework).

Both runners share these: shared.backends.cpu_runner (numpy arrays through the numba kernels, the CPU's) and
shared.backends.llama (torch ops, any device). Neither this module nor cpu_runner imports torch, so a CPU start
whose weights are packed already (see shared.backends.packed) never does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from shared.settings import Quantization

INT4_GROUP = 32
Kind = Literal["none", "int4", "int4-a8", "int8", "int8-groups"]  # how one Linear stores its weight (see Linear)
A = TypeVar("A")  # an array: torch.Tensor or np.ndarray
P = TypeVar("P")  # a projection: x (N, in) -> (N, out)
E = TypeVar("E")  # an embedding: token ids -> float32 rows (N, C)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None = None  # the runner's context is capped to it: within it, attention is full
    # Gemma 3 (model_type gemma3_text): each layer attends over its own window (None: every position) with its
    # own rotary base; RMSNorm weights are offsets from 1; q and k are RMS-normed per head; the attention and
    # MLP outputs are normed before the residual add; the embedding is scaled; the MLP is GELU (tanh).
    gemma: bool = False
    qk_norm: bool = False  # q and k RMS-normed per head before the rotation (Gemma 3, Qwen3)
    layer_windows: tuple[int | None, ...] = ()
    layer_rope_thetas: tuple[float, ...] = ()
    attention_scale: float | None = None  # None: head_dim ** -0.5

    @classmethod
    def from_dir(cls, model_dir: Path) -> LlamaConfig | None:
        """The config, or None when the checkpoint is not one this file implements."""
        c = json.loads((model_dir / "config.json").read_text())
        if unsupported(c) is not None:
            return None
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        heads = c["num_attention_heads"]
        layers = c["num_hidden_layers"]
        gemma = c["model_type"] == "gemma3_text"
        common = {
            "vocab_size": c["vocab_size"],
            "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"],
            "num_layers": layers,
            "num_heads": heads,
            "num_kv_heads": c.get("num_key_value_heads", heads),
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
            "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
            "tie_word_embeddings": c.get("tie_word_embeddings", gemma),
            "max_position_embeddings": c.get("max_position_embeddings", 2048),
        }
        if gemma:
            types = c["layer_types"]
            return cls(
                **common,
                rope_theta=float(rope["full_attention"]["rope_theta"]),
                gemma=True,
                qk_norm=True,
                layer_windows=tuple(c["sliding_window"] if t == "sliding_attention" else None for t in types),
                layer_rope_thetas=tuple(float(rope[t]["rope_theta"]) for t in types),
                attention_scale=c["query_pre_attn_scalar"] ** -0.5,
            )
        theta = float(c.get("rope_theta", rope.get("rope_theta", 10000.0)))
        return cls(
            **common,
            rope_theta=theta,
            sliding_window=c.get("sliding_window")
            if c["model_type"] not in ("qwen2", "qwen3") or c.get("use_sliding_window")
            else None,
            qk_norm=c["model_type"] == "qwen3",
            layer_windows=(None,) * layers,
            layer_rope_thetas=(theta,) * layers,
        )


def unsupported(c: dict[str, Any]) -> str | None:
    """What in a config.json this runner does not implement, or None. A field it ignored would compute wrong
    logits without a word, so such a checkpoint goes to transformers' own model instead."""
    kind = c.get("model_type")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if kind == "gemma3_text":
        ropes = [rope.get(t, {}) for t in set(c.get("layer_types", []))] or [{"rope_type": "missing"}]
        checks = [
            (all(r.get("rope_type", "default") == "default" for r in ropes), f"rope scaling {rope!r}"),
            (c.get("hidden_activation") == "gelu_pytorch_tanh", f"hidden_activation {c.get('hidden_activation')!r}"),
            (c.get("attn_logit_softcapping") is None, "attn_logit_softcapping"),
            (c.get("final_logit_softcapping") is None, "final_logit_softcapping"),
            (not c.get("use_bidirectional_attention"), "use_bidirectional_attention"),
            (not c.get("attention_bias"), "attention_bias"),
        ]
        return next((what for ok, what in checks if not ok), None)
    checks = [
        (kind in ("llama", "mistral", "qwen2", "qwen3"), f"model_type {kind!r}"),
        (rope.get("rope_type", rope.get("type", "default")) == "default", f"rope scaling {rope!r}"),
        (c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}"),
        (c.get("pretraining_tp", 1) == 1, "pretraining_tp"),
    ]
    return next((what for ok, what in checks if not ok), None)


@dataclass
class Layer(Generic[A, P]):
    attn_norm: A
    qkv: P
    o: P
    mlp_norm: A
    gate_up: P
    down: P
    # Biases, float32, where the checkpoint has them (Qwen2's q/k/v; Llama's attention_bias and mlp_bias)
    qkv_bias: A | None = None
    o_bias: A | None = None
    gate_up_bias: A | None = None
    down_bias: A | None = None
    # Gemma 3: per-head q and k norms, and norms of the attention and MLP outputs before the residual add
    q_norm: A | None = None
    k_norm: A | None = None
    attn_out_norm: A | None = None
    mlp_out_norm: A | None = None


@dataclass
class Weights(Generic[A, P, E]):
    """A runner's weights as its kernels read them, under the quantization they were prepared for."""

    quantization: Quantization
    embed: E
    lm_head: P
    norm: A
    layers: list[Layer[A, P]]
