"""Llama-family decoder for batched serving on torch: static KV cache, batched decode, optional int4 weights.

One readable file (nanoGPT-style). Loads the Hugging Face layout (config.json + model.safetensors) that
`shared.sources` produces, so it serves SmolLM2 and other `model_type: llama` checkpoints. The KV cache is
allocated once, `slots` sequences by `max_len` positions; the engine keeps its running sequences in slots
0..n-1 so that a decode step reads the cache through views, never a gather.
Shapes: B batch, T new tokens, S slots, H query heads, K kv heads, D head dim, C hidden, P cached positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

INT4_GROUP = 32


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

    @classmethod
    def from_dir(cls, model_dir: Path) -> LlamaConfig | None:
        """The config, or None when the checkpoint is not a plain Llama this file implements."""
        c = json.loads((model_dir / "config.json").read_text())
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if c.get("model_type") != "llama" or rope.get("rope_type", "default") != "default":
            return None
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
        )


class Linear:
    """y = x @ W.T, with W dense (float32/bfloat16) or packed to int4 (groups of 32 along the input)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, int4: bool) -> None:
        self.out_features, self.in_features = weight.shape
        self.int4 = int4 and self.in_features % INT4_GROUP == 0
        if self.int4:
            # Asymmetric 4-bit per group: w = (q - 8) * scale + zero, q in 0..15 (torch's int4pack layout).
            w = weight.float().reshape(self.out_features, -1, INT4_GROUP)  # (N, K/G, G)
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(self.out_features, -1)
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            zero = lo + 8 * scale
            sz = torch.cat([scale, zero], dim=-1).transpose(0, 1)  # (K/G, N, 2)
            self.scales_zeros = sz.contiguous().to(torch.bfloat16)
        else:
            self.weight = weight.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.int4:
            return F.linear(x, self.weight)
        lead = x.shape[:-1]
        # The int4 kernel is fast with bfloat16 activations only (40x slower with float32).
        y = torch._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, INT4_GROUP, self.scales_zeros
        )
        return y.reshape(*lead, self.out_features).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def additive(visible: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask as the float32 one added to the scores: 0 where visible, -inf elsewhere."""
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per sequence, (B, H, 1, D), over its cached keys and values (B, K, P, D).

    The mask is additive: 0 where a sequence sees a position, -inf past its own length.

    Two batched matmuls with each kv head's query group as the rows. Against scaled_dot_product_attention's
    CPU kernel here (200-400 positions): 320 vs 417 us a layer at 16 rows, 134 vs 146 at 8, but 38 vs 25 at
    1 row, so the engine uses it from 8 rows up.
    """
    b, heads, _, d = q.shape
    kv_heads = k.shape[1]
    q = q.view(b, kv_heads, heads // kv_heads, d)  # (B, K, G, D): query head h reads kv head h // G
    scores = torch.matmul(q, k.transpose(-1, -2)) * d**-0.5 + mask  # (B, K, G, P); mask (B, 1, 1, P)
    return torch.matmul(scores.softmax(-1), v).view(b, heads, 1, d)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaRunner:
    """The model plus its KV cache. Not thread-safe: one engine thread drives it."""

    def __init__(
        self,
        model_dir: Path,
        config: LlamaConfig,
        *,
        dtype: torch.dtype,
        int4: bool,
        slots: int,
        max_len: int,
        head_dtype: torch.dtype | None = None,
    ) -> None:
        self.config = c = config
        self.dtype = dtype
        self.slots = slots
        self.context_length = min(max_len, c.max_position_embeddings)
        w = load_file(str(model_dir / "model.safetensors"))

        def get(name: str) -> torch.Tensor:
            return w[f"model.{name}"] if f"model.{name}" in w else w[name]

        self.embed = get("embed_tokens.weight").to(dtype)
        head = self.embed if c.tie_word_embeddings or "lm_head.weight" not in w else w["lm_head.weight"]
        self.lm_head = Linear(head, head_dtype or dtype, int4 and head_dtype is None)
        self.norm = get("norm.weight").to(dtype)
        self.layers = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            qkv = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            gate_up = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            self.layers.append(
                Layer(
                    attn_norm=get(p + "input_layernorm.weight").to(dtype),
                    qkv=Linear(qkv, dtype, int4),
                    o=Linear(get(p + "self_attn.o_proj.weight"), dtype, int4),
                    mlp_norm=get(p + "post_attention_layernorm.weight").to(dtype),
                    gate_up=Linear(gate_up, dtype, int4),
                    down=Linear(get(p + "mlp.down_proj.weight"), dtype, int4),
                )
            )
        shape = (c.num_layers, slots, c.num_kv_heads, self.context_length, c.head_dim)  # (L, S, K, P, D)
        # Attention runs in float32 whatever the weights: torch's CPU attention took 18 us a layer in float32
        # and 90 us in bfloat16 here (one decode row, 120 positions), and float32 keys are more exact too.
        self.k_cache = torch.zeros(shape, dtype=torch.float32)
        self.v_cache = torch.zeros(shape, dtype=torch.float32)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        angles = torch.outer(torch.arange(self.context_length, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (P, D), the non-interleaved (rotate-half) layout
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], start: int) -> np.ndarray:
        """Run token_ids for one sequence at positions start.. in its slot; the last position's logits."""
        tokens = torch.tensor([token_ids])  # (1, T)
        positions = torch.arange(start, start + len(token_ids)).unsqueeze(0)  # (1, T)
        end = start + len(token_ids)
        keys = torch.arange(end)
        mask = additive((keys[None, :] <= positions[0][:, None]).view(1, 1, len(token_ids), end))  # causal
        logits = self._forward(tokens, positions, slice(slot, slot + 1), end, mask)
        return logits[0].float().numpy()

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> np.ndarray:
        """One token for each sequence in slots 0..B-1 at its position; logits (B, vocab) float32."""
        b = len(token_ids)
        tokens = torch.tensor(token_ids).view(b, 1)
        pos = torch.tensor(positions).view(b, 1)
        end = max(positions) + 1
        mask = additive((torch.arange(end)[None, :] <= pos).view(b, 1, 1, end))  # each sees its own prefix
        return self._forward(tokens, pos, slice(0, b), end, mask).float().numpy()

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache to another slot (the engine compacts its running set)."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: slice, end: int, mask: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        b, t = tokens.shape
        x = F.embedding(tokens, self.embed)  # (B, T, C)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B, 1, T, D)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, c.rms_norm_eps)
            qkv = layer.qkv(h)
            kv_width = c.num_kv_heads * c.head_dim
            q, k, v = qkv.split([c.num_heads * c.head_dim, kv_width, kv_width], -1)
            q = rotate(q.view(b, t, c.num_heads, c.head_dim).transpose(1, 2), cos, sin).float()  # (B, H, T, D)
            k = rotate(k.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin).float()  # (B, K, T, D)
            v = v.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2).float()
            k_cache, v_cache = self.k_cache[i, slots], self.v_cache[i, slots]  # views, (B, K, P, D)
            if t == 1:
                rows = torch.arange(b)
                k_cache[rows, :, positions[:, 0]] = k[:, :, 0]
                v_cache[rows, :, positions[:, 0]] = v[:, :, 0]
            else:
                start = int(positions[0, 0])
                k_cache[:, :, start : start + t] = k
                v_cache[:, :, start : start + t] = v
            if t == 1 and b >= 8:
                attn = decode_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], mask)
            else:
                attn = F.scaled_dot_product_attention(
                    q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, enable_gqa=True
                )  # (B, H, T, D)
            x = x + layer.o(attn.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim).to(x.dtype))
            h = rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = rms_norm(x[:, -1], self.norm, c.rms_norm_eps)  # (B, C): only the last position is sampled
        return self.lm_head(x.to(self.lm_head.weight.dtype) if not self.lm_head.int4 else x)  # (B, vocab)
