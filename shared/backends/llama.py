"""Llama-family decoder for batched serving on torch: static KV cache, batched decode, optional int4 weights.

One readable file (nanoGPT-style). Loads the Hugging Face layout (config.json + model.safetensors) that
`shared.sources` produces, so it serves SmolLM2 and other `model_type: llama` checkpoints. The KV cache is
allocated once, `slots` sequences by `max_len` positions; the engine keeps its running sequences in slots
0..n-1 so that a decode step reads the cache through views, never a gather. Here the weights are read, checked
and quantized (torch; the formats in shared.backends.projections), and the model runs as torch ops on any device
(LlamaRunner); on the CPU it runs in shared.backends.cpu_runner (numpy and the numba kernels), which `runner`
picks.
Shapes: B batch, T new tokens, S slots, H query heads, K kv heads, D head dim, C hidden, P cached positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from shared.backends import BatchSteps, Chunk, projections, step_rows
from shared.backends.cpu_runner import ByteEmbedding, CpuRunner, CpuWeights, DotLinear, Projection
from shared.backends.cpu_runner import load as load_cpu_runner
from shared.backends.device_steps import DecodeGraphs, DeviceStep, Rope, device_step
from shared.backends.llama_config import INT4_GROUP, Kind, Layer, LlamaConfig, Weights
from shared.backends.packed import PackedWeights
from shared.backends.projections import (
    Embedding,
    Groups4,
    Groups8,
    Linear,
    MixedLinear,
    dense_dtype,
    dense_stored,
    exact_groups4,
    exact_groups8,
    linear,
    lossless_at_4_bits,
    quantize_groups4,
    quantize_groups8,
)
from shared.settings import Quantization

log = logging.getLogger(__name__)


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy: a view would keep the whole memory-mapped checkpoint resident (540 MB for SmolLM2)."""
    return t.to(device=device, dtype=torch.float32, copy=True)


def _biased(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.float() + bias


TorchWeights = Weights[torch.Tensor, Linear | MixedLinear, Embedding]


def _load_weights(
    model_dir: Path, c: LlamaConfig, dtype: torch.dtype, quantization: Quantization, dev: torch.device
) -> TorchWeights:
    """The checkpoint's weights, checked (`auto`), quantized and packed for the kernels."""
    w = load_file(str(model_dir / "model.safetensors"))

    def get(name: str) -> torch.Tensor:
        return w[f"model.{name}"] if f"model.{name}" in w else w[name]

    def biases(*names: str) -> torch.Tensor | None:
        """The named projections' biases, concatenated, or None when the checkpoint has none."""
        found = [f"model.{n}.bias" in w or f"{n}.bias" in w for n in names]
        if not any(found):
            return None
        if not all(found):
            raise ValueError(f"biases on some of {names} but not all: not a layout this runner implements")
        return torch.cat([get(f"{n}.bias") for n in names]).float().to(dev)

    if quantization == "int4-a8" and not projections.DOT_KERNELS:
        log.warning("quantization int4-a8 needs a CPU with AVX2 or AVX-512 VNNI: running int4 (bfloat16 inputs)")
        quantization = "int4"
    groups4: dict[str, Groups4] = {}  # auto's check: each projection's 4-bit groups, kept for packing
    embed = get("embed_tokens.weight")
    groups: Groups8 | None = None
    # auto, where the layers are not all 4-bit groups: each projection on the kernel that keeps its stored values
    # (exact_groups8), else dense. Labelled int4-a8 as the all-4-bit case is: integer kernels and an 8-bit table
    # (what the packed file records); each projection's own kind says the rest.
    as_stored = False
    if quantization == "auto":
        proj_keys = [k for k in w if k.endswith("proj.weight")]
        exact = dev.type == "cpu" and not any(w[k].shape[1] % INT4_GROUP for k in proj_keys)
        for k in proj_keys if exact else []:
            groups4[k] = quantize_groups4(w[k])
            if not (exact := lossless_at_4_bits(w[k], groups4[k])):
                break
        if not exact:
            groups4.clear()
            # Other GGUF blocks: the 8-bit kernel keeps Q8_0, Q5_0 and Q4_0 exactly, given an 8-bit table too
            as_stored = (
                dev.type == "cpu" and bool(projections.DOT_KERNELS) and (groups := exact_groups8(embed)) is not None
            )
        quantization = ("int4-a8" if projections.DOT_KERNELS else "int4") if exact or as_stored else "none"
        state = "are" if exact else f"are not: weights in {str(dtype).removeprefix('torch.')}"
        if not as_stored:
            log.info("quantization auto: %s (layer weights %s 4-bit groups already)", quantization, state)
    if quantization != "none" and groups is None:
        groups = quantize_groups8(embed)
    embedding = Embedding(embed, dtype, groups, dev)
    dense = dense_dtype(dtype, dev)  # as_stored: the dtype of projections (and an own head) left unquantized

    def stored(weight: torch.Tensor, kind: Kind, exact8: Groups8 | None, exact4: Groups4 | None = None) -> Linear:
        if kind == "none":
            return dense_stored(weight, dtype, dev)
        return Linear(weight, dtype, kind, exact8, dev, groups4=exact4)

    if c.tie_word_embeddings or "lm_head.weight" not in w:  # one table: a dense one serves both (Gemma: 335 MB)
        tied = embed if embedding.dense is None else embedding.dense
        lm_head = linear(tied, dtype, quantization, head=True, groups8=groups, device=dev)
    elif as_stored:  # its own table: at 8 bits where it is stored so, else dense
        head = w["lm_head.weight"]
        exact8 = exact_groups8(head)
        lm_head = stored(head, "none" if exact8 is None else "int8-groups", exact8)
    else:
        lm_head = linear(w["lm_head.weight"], dtype, quantization, head=True, device=dev)
    offset = 1.0 if c.gemma else 0.0  # Gemma's RMSNorm weights are stored as w - 1

    def norm(name: str) -> torch.Tensor:
        return _copy(get(name), dev) + offset

    def project(*names: str) -> Linear | MixedLinear:
        """The named projections, concatenated along their outputs, under the quantization."""
        keys = [f"model.{n}.weight" if f"model.{n}.weight" in w else f"{n}.weight" for n in names]
        weight = torch.cat([w[k] for k in keys]) if len(keys) > 1 else w[keys[0]]
        if as_stored:
            blocks = weight.shape[0] % 16 == 0  # the dot kernels' column blocks
            exact8 = exact_groups8(weight) if blocks else None
            exact4 = exact_groups4(weight) if blocks and exact8 is None else None  # Q4_K's own groups
            kind: Kind = "int8-groups" if exact8 is not None else "int4-a8" if exact4 is not None else "none"
            kinds[kind] = kinds.get(kind, 0) + 1
            return stored(weight, kind, exact8, exact4)
        found = [groups4[k] for k in keys if k in groups4]
        groups = tuple(torch.cat(parts) for parts in zip(*found, strict=True)) if found else None
        return linear(weight, dtype, quantization, device=dev, groups4=groups)  # type: ignore[arg-type]

    kinds: dict[Kind, int] = {}  # as_stored: the projections of each kind
    layers = []
    for i in range(c.num_layers):
        p = f"layers.{i}."
        extra = (
            {"q_norm": norm(p + "self_attn.q_norm.weight"), "k_norm": norm(p + "self_attn.k_norm.weight")}
            if c.qk_norm
            else {}
        )
        if c.gemma:
            extra["attn_out_norm"] = norm(p + "post_attention_layernorm.weight")
            extra["mlp_out_norm"] = norm(p + "post_feedforward_layernorm.weight")
        layers.append(
            Layer(
                attn_norm=norm(p + "input_layernorm.weight"),
                qkv=project(*(p + f"self_attn.{n}_proj" for n in "qkv")),
                o=project(p + "self_attn.o_proj"),
                mlp_norm=norm(p + ("pre_feedforward_layernorm" if c.gemma else "post_attention_layernorm") + ".weight"),
                gate_up=project(p + "mlp.gate_proj", p + "mlp.up_proj"),
                down=project(p + "mlp.down_proj"),
                qkv_bias=biases(*(p + f"self_attn.{n}_proj" for n in "qkv")),
                o_bias=biases(p + "self_attn.o_proj"),
                gate_up_bias=biases(p + "mlp.gate_proj", p + "mlp.up_proj"),
                down_bias=biases(p + "mlp.down_proj"),
                **extra,
            )
        )
    if as_stored:
        names = {"int8-groups": "8-bit groups", "int4-a8": "4-bit groups", "none": str(dense).removeprefix("torch.")}
        found = ", ".join(f"{n} {names[k]}" for k, n in sorted(kinds.items()))
        head_kind = "8 bits" if isinstance(lm_head, Linear) and lm_head.quantization == "int8-groups" else "dense"
        log.info("quantization auto: as stored, per projection (%s; the head %s, as stored)", found, head_kind)
    return Weights(quantization, embedding, lm_head, norm("norm.weight"), layers)


class LlamaRunner(BatchSteps):
    """The model plus its KV cache as torch ops, on any torch device. Not thread-safe: one engine drives it.

    One code path for the model's math on any torch device (the CPU's default, shared.backends.cpu_runner, runs
    the same model through numba kernels): scaled_dot_product_attention (flash or memory-efficient kernels where
    the device has them), torch's rms_norm, over a cache in the model dtype allocated once. Weights, embedding,
    sampling inputs and the engine are the same for both. graphs: decode steps replay CUDA graphs (DecodeGraphs).
    """

    def __init__(
        self,
        model_dir: Path,
        config: LlamaConfig,
        *,
        dtype: torch.dtype,
        quantization: Quantization,
        slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        graphs: bool = False,
    ) -> None:
        self.config = c = config
        self.dtype = dtype
        self.slots = slots
        self.device = dev = torch.device(device)
        if quantization not in ("none", "auto") and dev.type != "cpu":
            raise ValueError(f"quantization {quantization!r} runs on the CPU only; use 'none' on {dev}")
        self.context_length = min(max_len, c.max_position_embeddings, c.sliding_window or max_len)
        weights = _load_weights(model_dir, c, dtype, quantization, dev)
        self.quantization = weights.quantization
        self.embed, self.lm_head, self.norm, self.layers = weights.embed, weights.lm_head, weights.norm, weights.layers
        self._eps = float(np.float32(c.rms_norm_eps))
        scratch = 1 if graphs else 0  # DecodeGraphs' slot for the rows past a step's own
        shape = (c.num_layers, 2, slots + scratch, c.num_kv_heads, self.context_length, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=dev)  # one allocation in the model dtype, once
        self._ropes = {t: Rope.on(dev, t, c.head_dim, self.context_length) for t in set(c.layer_rope_thetas)}
        self._windows = [w or 0 for w in c.layer_windows]  # each layer's; 0: none
        self._distinct_windows = set(self._windows)  # the masks a step makes
        self._embed_scale = float(np.float32(c.hidden_size**0.5)) if c.gemma else None  # as float32 weights get
        self.graphs = (
            DecodeGraphs(self._forward, dev, slots, self.context_length, self._ropes, self._distinct_windows)
            if graphs
            else None
        )
        if self.graphs is not None and dev.type == "cuda":
            self.graphs.capture_all()

    def move_slot(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Copy a sequence's cache to another slot (the engine compacts its running set, the prefix cache keeps
        it), from position `start` when dst holds the ones before already."""
        self.kv_cache[:, :, dst, :, start:length] = self.kv_cache[:, :, src, :, start:length]

    def release_slot(self, slot: int) -> None:
        """Nothing: a device's cache stays allocated."""

    @torch.inference_mode()
    def _logits(self, token_ids: list[int], positions: np.ndarray, chunk: Chunk | None) -> np.ndarray:
        """Logits for B decode rows (slots 0..B-1, one token each) and the last token of a prompt chunk."""
        if chunk is None and self.graphs is not None:
            return self.graphs.decode(token_ids, positions).cpu().numpy()
        b, ids = len(token_ids), token_ids + (chunk.token_ids if chunk else [])
        step = device_step(self.device, ids, *step_rows(positions, chunk), b, self._ropes, self._distinct_windows)
        return self._forward(step, b).cpu().numpy()

    def _forward(self, step: DeviceStep, b: int) -> torch.Tensor:
        """Float32 logits on the device of a step's b decode rows and, where it has one, its chunk's last row.

        Every per-token step works on (N, features) rows, decode rows first, then the chunk's. The residual
        stream, norms, rotation and attention are float32 whatever the weights; only matmul inputs are cast.
        """
        c = self.config
        n, q_width, k_width = len(step.token_ids), c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        scale = float(np.float32(c.attention_scale or c.head_dim**-0.5))
        x = self.embed(step.token_ids)
        if self._embed_scale is not None:
            x = x * self._embed_scale
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.attn_norm)).float()  # (N, Q+2KV)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            if layer.q_norm is not None and layer.k_norm is not None:  # per head, before the rotation
                qkv[:, :q_width] = self._norm(qkv[:, :q_width].reshape(-1, c.head_dim), layer.q_norm).view(n, -1)
                k = qkv[:, q_width : q_width + k_width].reshape(-1, c.head_dim)
                qkv[:, q_width : q_width + k_width] = self._norm(k, layer.k_norm).view(n, -1)
            attn = self._attend(i, qkv, step, b, c.layer_rope_thetas[i], self._windows[i], scale)
            out = _biased(layer.o(attn), layer.o_bias)  # bfloat16 outputs add as float32
            x = x + (out if layer.attn_out_norm is None else self._norm(out.float(), layer.attn_out_norm))
            gate, up = _biased(layer.gate_up(self._norm(x, layer.mlp_norm)), layer.gate_up_bias).chunk(2, -1)
            act = F.gelu(gate.float(), approximate="tanh") if c.gemma else F.silu(gate)
            out = _biased(layer.down(act * up), layer.down_bias)
            x = x + (out if layer.mlp_out_norm is None else self._norm(out.float(), layer.mlp_out_norm))
        if n > b:
            x = torch.cat([x[:b], x[-1:]])  # a chunk samples its last position only
        return self.lm_head(self._norm(x, self.norm)).float()  # (B [+ 1], vocab)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of float32 rows (N, C)."""
        return F.rms_norm(x, (x.shape[-1],), weight, self._eps)

    def _attend(
        self,
        layer: int,
        qkv: torch.Tensor,
        step: DeviceStep,
        b: int,
        theta: float,
        window: int,
        scale: float,
    ) -> torch.Tensor:
        """The torch ops of the attention kernel: rotation, the cache write, then attention of the decode rows
        (slots 0..b-1, each over its own positions) and of the chunk's rows (one slot, causal): (N, Q) in the
        model dtype, which the output projection takes. With window > 0 a row sees only its last `window`
        positions."""
        c = self.config
        n, heads, kv_heads, dim = qkv.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        at, positions = step.slots, step.positions
        rotated = qkv[:, : (heads + kv_heads) * dim].view(n, heads + kv_heads, dim)
        cos, sin = step.rotations[theta]  # (N, 1, D)
        rotated = rotated * cos + rotated.roll(dim // 2, -1) * sin  # rotate-half; the sign lives in the table
        q, k = rotated[:, :heads].to(self.dtype), rotated[:, heads:]
        cache = self.kv_cache[layer]  # (2, S, K, P, D)
        cache[0, at, :, positions] = k.to(cache.dtype)  # (N, K, D) at each row's slot and position
        cache[1, at, :, positions] = qkv[:, (heads + kv_heads) * dim :].view(n, kv_heads, dim).to(cache.dtype)
        parts = []  # (B, H, D) of the decode rows, (T, H, D) of the chunk's
        if b:
            visible = step.decode_masks[window]  # (B, 1, 1, L)
            length = visible.shape[-1]
            parts.append(F.scaled_dot_product_attention(
                q[:b].unsqueeze(2), cache[0, :b, :, :length], cache[1, :b, :, :length],
                attn_mask=visible, enable_gqa=True, scale=scale,
            ).squeeze(2))  # fmt: skip
        if n > b:
            visible, slot = step.chunk_masks[window], step.chunk_slot  # (1, 1, T, end)
            keys, values = cache[:, slot : slot + 1, :, : visible.shape[-1]]  # (1, K, end, D)
            parts.append(F.scaled_dot_product_attention(
                q[b:].transpose(0, 1).unsqueeze(0), keys, values, attn_mask=visible, enable_gqa=True, scale=scale,
            )[0].transpose(0, 1))  # fmt: skip
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(n, heads * dim)


@dataclass(frozen=True)
class TorchProjection:
    """One of torch's kernels (int4pack, oneDNN's int8, dense) as a projection of the CPU runner's numpy rows."""

    linear: Linear | MixedLinear
    out_features: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.linear(torch.from_numpy(x)).float().numpy()


@dataclass(frozen=True)
class TorchEmbedding:
    """A dense table (in the model dtype) as the CPU runner's embedding."""

    embedding: Embedding

    def __call__(self, token_ids: list[int]) -> np.ndarray:
        return self.embedding(token_ids).numpy()


def cpu_weights(
    model_dir: Path,
    c: LlamaConfig,
    dtype: str,
    quantization: Quantization,
    packed: PackedWeights | None,
    threads: int | None = None,
) -> CpuWeights:
    """The CPU runner's weights where torch prepares them: read from the packed file (torch's int4pack planes) or
    the checkpoint, checked (`auto`), quantized and packed (then kept in the packed file), as numpy arrays of
    the same memory; projections of torch's kernels run as TorchProjection. threads: torch's, set here."""
    if threads:
        torch.set_num_threads(threads)  # per thread under OpenMP: the thread the model runs on loads it
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    known = packed.quantization() if packed else None  # what an earlier start resolved `auto` to
    weights = packed.load(torch_dtype) if packed and known in ("int4", "int4-a8") else None
    if weights is None:  # `none` marks a checkpoint auto found unquantizable: its check is not run again
        asked = "none" if known == "none" else quantization
        weights = _load_weights(model_dir, c, torch_dtype, asked, torch.device("cpu"))
        if packed and known != "none":  # none: `auto` found the checkpoint not 4-bit, nothing to keep
            packed.save(weights)

    def project(p: Linear | MixedLinear) -> DotLinear | TorchProjection:
        return p.dot_linear if isinstance(p, Linear) and p.dot_linear else TorchProjection(p, p.out_features)

    def array(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.numpy()

    def layer(torch_layer: Layer[torch.Tensor, Linear | MixedLinear]) -> Layer[np.ndarray, Projection]:
        parts: dict[str, Any] = {}
        for f in fields(Layer):
            value = getattr(torch_layer, f.name)
            parts[f.name] = project(value) if isinstance(value, Linear | MixedLinear) else array(value)
        return Layer(**parts)

    layers = [layer(t) for t in weights.layers]
    e = weights.embed
    embed = TorchEmbedding(e) if e.dense is not None else ByteEmbedding(e.q.numpy(), e.d.numpy())
    return Weights(weights.quantization, embed, project(weights.lm_head), weights.norm.numpy(), layers)


def runner(
    model_dir: Path,
    config: LlamaConfig,
    *,
    dtype: torch.dtype,
    quantization: Quantization,
    slots: int,
    max_len: int,
    device: torch.device | str = "cpu",
    kernels: Literal["numba", "torch"] | None = None,
    packed_dir: Path | None = None,
) -> CpuRunner | LlamaRunner:
    """The batched runner: kernels="numba" (the CPU's default) is the CPU runner (shared.backends.cpu_runner),
    "torch" (the default on any other device) LlamaRunner. packed_dir: where the CPU runner's int4 weights are
    kept as packed for its kernels (see PackedWeights); None packs them from the checkpoint at every start."""
    dev = torch.device(device)
    if (kernels or ("numba" if dev.type == "cpu" else "torch")) == "torch":
        return LlamaRunner(
            model_dir, config, dtype=dtype, quantization=quantization, slots=slots, max_len=max_len, device=dev
        )
    if dev.type != "cpu":
        raise ValueError("the numba kernels run on the CPU only")
    name = str(dtype).removeprefix("torch.")
    return load_cpu_runner(
        model_dir, config, dtype=name, quantization=quantization, slots=slots, max_len=max_len, packed_dir=packed_dir
    )
