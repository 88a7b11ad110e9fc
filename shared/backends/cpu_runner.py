"""The batched Llama runner on the CPU: numpy arrays through the numba kernels of shared.backends.kernels.

The CPU's specialisation of the model in shared.backends.llama (which runs it as torch ops on any device). It
imports no torch: weights packed for the numba kernels (shared.backends.packed) map straight into it, so such a
start skips torch's import (~1.5 s and ~175 MB of a function's cold start here). Weights that the numba kernels
do not read (a checkpoint that is not 4-bit, `mixed`, a CPU without AVX2) are prepared by torch
(llama.cpu_weights), and its matmuls then run inside this same forward.
Shapes: B batch, T new tokens, S slots, H query heads, K kv heads, D head dim, C hidden, P cached positions.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from shared.backends import BatchSteps, Chunk, step_rows
from shared.backends.kernels.attention import KEY_BLOCK, attention
from shared.backends.kernels.isa import float16_native
from shared.backends.kernels.matmul import int4_a8_matmul, int4_matmul, int8_matmul
from shared.backends.kernels.rows import add_rms_norm, gated, rms_norm
from shared.backends.llama_config import Kind, LlamaConfig, Weights
from shared.backends.packed import PackedWeights
from shared.settings import Quantization

log = logging.getLogger(__name__)


class Projection(Protocol):
    @property
    def out_features(self) -> int: ...

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (N, in) float32, C-contiguous; the result (N, out) float32."""
        ...


class Embed(Protocol):
    def __call__(self, token_ids: list[int]) -> np.ndarray:
        """The float32 rows (N, C) of these tokens."""
        ...


CpuWeights = Weights[np.ndarray, Projection, Embed]


@dataclass(frozen=True)
class DotLinear:
    """A projection through the numba dot kernels, its planes as they read them (see projections.Linear's kinds):

    - int4-a8: (nibbles, scale and minimum as float16 bits); int4_a8_matmul quantizes each input row to 8 bits
      in groups of 32 and multiplies integers (llama.cpp's arithmetic for Q4_1).
    - int4: one or more (quads, scale and zero as bfloat16 bits), summed. Each group of 32 inputs is a dot
      product of x in bfloat16 and the 4-bit values q - 8 (exact in bfloat16; AVX-512 BF16's vdpbf16ps,
      products exact, summed in float32), then scaled: y += scale * dot + zero * sum(x over the group). Against
      torch's int4pack kernel (which rounds every weight to float32 and its output to bfloat16) it is more exact,
      and at 16 rows ~1.5-2x faster: each 4-bit value is decoded once for 8 rows, and one instruction multiplies
      32 of them.
    - int8-groups: (Q8_0 values, float32 scales); int8_matmul quantizes each input row to 16 bits in groups of
      32 and multiplies integers (the output head).
    A row's result depends on its own inputs only (docs/engine.md, "Speed")."""

    kind: Kind
    planes: list[tuple[np.ndarray, np.ndarray]]
    out_features: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "int8-groups":
            return int8_matmul(x, *self.planes[0], self.out_features)
        if self.kind == "int4-a8":
            return int4_a8_matmul(x, *self.planes[0], self.out_features)
        y = int4_matmul(x, *self.planes[0], self.out_features)
        for plane in self.planes[1:]:
            y += int4_matmul(x, *plane, self.out_features)
        return y


@dataclass(frozen=True)
class ByteEmbedding:
    """The token table at 8 bits in groups of 32 (half bfloat16's memory, and exact for a GGUF's Q8_0 table):
    q (V, C/32, 32) int8 and d (V, C/32) float32, de-quantised row by row as tokens are looked up."""

    q: np.ndarray
    d: np.ndarray

    def __call__(self, token_ids: list[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        return (self.q[ids].astype(np.float32) * self.d[ids][..., None]).reshape(len(ids), -1)


def rope_tables(theta: float, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One rotary base's float32 tables, (P, D): x * cos + (x2, x1) * signed_sin is the rotate-half rotation."""
    inv_freq = np.float32(1.0) / np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.outer(np.arange(length, dtype=np.float32), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)  # (P, D), the non-interleaved (rotate-half) layout
    half = head_dim // 2
    signed_sin = np.concatenate([-np.sin(angles[:, :half]), np.sin(angles[:, half:])], axis=-1)
    return np.cos(angles), signed_sin


class CpuRunner(BatchSteps):
    """The model plus its KV cache, on the CPU. Not thread-safe: one engine drives it.

    Rotation, the cache write, attention and RMSNorm run as the numba kernels, over a float16 cache (float32 for
    exact float32 weights, or on an x86 CPU without F16C); the matmuls as the weights' projections (DotLinear,
    or torch's kernels); everything else as numpy ops on float32 rows.
    """

    def __init__(self, config: LlamaConfig, weights: CpuWeights, *, slots: int, max_len: int, half: bool) -> None:
        self.config = c = config
        self.slots = slots
        self.quantization = weights.quantization
        self.context_length = min(max_len, c.max_position_embeddings, c.sliding_window or max_len)
        self.embed, self.lm_head, self.norm, self.layers = weights.embed, weights.lm_head, weights.norm, weights.layers
        self._attention = attention(c.head_dim, c.num_heads // c.num_kv_heads, half)  # compiled for these sizes
        self._eps = np.float32(c.rms_norm_eps)
        # Keys and values of every layer, slot and position: (L, 2, S, K, P, D), positions rounded up to whole
        # blocks of keys, each block's keys stored dimension by dimension (the layout `attention` describes):
        # a 16-row decode step reads each row's cache once, and float16 halves those bytes (docs/engine.md).
        # An anonymous mapping reads as zeros and gets memory page by page as positions are first written, so
        # the cache holds memory for the positions sequences reach, not every slot's full context (numpy's
        # zeros ask for huge pages, 2 MB of which span several slots' whole contexts).
        self._keep_pages = False  # set when the system cannot take pages back (see release_slot)
        blocks = -(-self.context_length // KEY_BLOCK)
        shape = (c.num_layers, 2, slots, c.num_kv_heads, blocks * KEY_BLOCK, c.head_dim)
        element = np.dtype(np.uint16 if half else np.float32)  # uint16: float16 bits, numba has no float16
        pages = self._pages = mmap.mmap(-1, math.prod(shape) * element.itemsize)
        self._kv_arrays = np.frombuffer(pages, dtype=element).reshape(shape)  # for the attention kernel
        self.kv_cache = self._kv_arrays.view(np.float16) if half else self._kv_arrays  # the same memory
        ropes = {t: rope_tables(t, c.head_dim, self.context_length) for t in set(c.layer_rope_thetas)}
        # Each layer's attention arguments beside its rows: rotary tables, cache keys and values, window.
        self._layer_attention = [
            (*ropes[c.layer_rope_thetas[i]], *self._kv_arrays[i], c.layer_windows[i] or 0) for i in range(c.num_layers)
        ]
        self._embed_scale = np.float32(c.hidden_size**0.5) if c.gemma else None  # as float32 weights get
        self.decode([0], [0])  # compiles the attention kernel now (or loads it from numba's cache), not on a request

    def move_slot(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Copy a sequence's cache to another slot (the engine compacts its running set, the prefix cache keeps
        it), from position `start` when dst holds the ones before already."""
        values = self._kv_arrays[:, 1]
        values[:, dst, :, start:length] = values[:, src, :, start:length]
        layers, _, slots, heads, positions, dim = self._kv_arrays.shape
        keys = self._kv_arrays[:, 0].reshape(layers, slots, heads, positions // KEY_BLOCK, dim, KEY_BLOCK)
        whole = range(-(-start // KEY_BLOCK), length // KEY_BLOCK)  # blocks inside [start, length)
        keys[:, dst, :, whole.start : whole.stop] = keys[:, src, :, whole.start : whole.stop]
        for block in {start // KEY_BLOCK, length // KEY_BLOCK} - set(whole):  # partly inside: those positions
            first, end = max(start - block * KEY_BLOCK, 0), min(length - block * KEY_BLOCK, KEY_BLOCK)
            if end > first:
                keys[:, dst, :, block, :, first:end] = keys[:, src, :, block, :, first:end]

    def release_slot(self, slot: int) -> None:
        """Return the pages of a slot's cache to the system: the cache is a shared anonymous mapping, whose removed
        pages read as zeros after and take memory again only when written."""
        remove = getattr(mmap, "MADV_REMOVE", None)  # Linux's; elsewhere (macOS) the pages stay until reused
        if remove is None or self._keep_pages:
            return
        layers, kinds, slots, heads, positions, dim = self._kv_arrays.shape
        block = heads * positions * dim * self._kv_arrays.itemsize  # a layer's keys (or values) of a slot: contiguous
        page = mmap.PAGESIZE
        for i in range(layers * kinds):
            start = (i * slots + slot) * block
            first, end = -(-start // page) * page, (start + block) // page * page  # whole pages of this slot only
            if end > first:
                try:
                    self._pages.madvise(remove, first, end - first)
                except OSError as exc:  # a kernel without it: the pages stay until the slot is written again
                    log.warning("cannot give KV-cache pages back (%s); a slot keeps its memory until reused", exc)
                    self._keep_pages = True
                    return

    def _logits(self, token_ids: list[int], positions: np.ndarray, chunk: Chunk | None) -> np.ndarray:
        """Logits for B decode rows (slots 0..B-1, one token each) and the last token of a prompt chunk.

        Every per-token step works on (N, features) float32 rows, decode rows first, then the chunk's. Rotation,
        the cache write and attention are one numba call for all rows; a numpy op costs ~1 us of dispatch, where
        torch's took 2-5 us, about as much as a one-row int4 matmul."""
        c = self.config
        b, t = len(token_ids), len(chunk.token_ids) if chunk else 0
        n, q_width, k_width = b + t, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        scale = np.float32(c.attention_scale or c.head_dim**-0.5)
        x = self.embed(token_ids + (chunk.token_ids if chunk else []))
        if self._embed_scale is not None:
            x = x * self._embed_scale
        slots, rows = step_rows(positions, chunk)
        last = len(self.layers) - 1
        h = self._norm(x, self.layers[0].attn_norm)
        for i, layer in enumerate(self.layers):
            qkv = _biased(layer.qkv(h), layer.qkv_bias)  # (N, Q+2KV)
            if layer.q_norm is not None and layer.k_norm is not None:  # per head, before the rotation
                qkv[:, :q_width] = self._norm(qkv[:, :q_width].reshape(-1, c.head_dim), layer.q_norm).reshape(n, -1)
                k = qkv[:, q_width : q_width + k_width].reshape(-1, c.head_dim)
                qkv[:, q_width : q_width + k_width] = self._norm(k, layer.k_norm).reshape(n, -1)
            attn = np.empty((n, q_width), np.float32)
            cos, signed_sin, cache_k, cache_v, window = self._layer_attention[i]
            self._attention(qkv, cos, signed_sin, slots, rows, cache_k, cache_v, attn, scale, window)
            out = _biased(layer.o(attn), layer.o_bias)
            if layer.attn_out_norm is not None:
                out = self._norm(out, layer.attn_out_norm)
            x, h = add_rms_norm(x, out, layer.mlp_norm, self._eps)  # the residual, and the MLP's input
            gate_up = _biased(layer.gate_up(h), layer.gate_up_bias)
            out = _biased(layer.down(gated(gate_up, c.gemma)), layer.down_bias)
            if layer.mlp_out_norm is not None:
                out = self._norm(out, layer.mlp_out_norm)
            x, h = add_rms_norm(x, out, self.norm if i == last else self.layers[i + 1].attn_norm, self._eps)
        if chunk:
            h = np.concatenate([h[:b], h[-1:]])  # a chunk samples its last position only
        return self.lm_head(h)  # (B, vocab)

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """RMSNorm of float32 rows (N, C)."""
        return rms_norm(np.ascontiguousarray(x), weight, self._eps)


def _biased(y: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    return y if bias is None else y + bias


def load(
    model_dir: Path,
    config: LlamaConfig,
    *,
    dtype: str,
    quantization: Quantization,
    slots: int,
    max_len: int,
    packed_dir: Path | None = None,
    threads: int | None = None,
) -> CpuRunner:
    """The CPU runner for a checkpoint. Weights packed for the numba kernels by an earlier start (or an image's
    build: `fnserve prepare`) are mapped from packed_dir without torch; anything else is read, checked and
    packed by torch (and kept in packed_dir for the next start). threads: torch's, where its kernels run."""
    packed = (
        PackedWeights(packed_dir, model_dir, quantization, dtype)
        if packed_dir is not None and quantization in ("auto", "int4", "int4-a8")
        else None
    )
    weights = packed.arrays() if packed else None
    if weights is None:
        from shared.backends.llama import cpu_weights  # torch: its import only where the weights need it

        weights = cpu_weights(model_dir, config, dtype, quantization, packed, threads)
    half = not (weights.quantization == "none" and dtype == "float32") and float16_native()
    return CpuRunner(config, weights, slots=slots, max_len=max_len, half=half)
