"""attention: every row of a step (a decode token per sequence, and a prompt chunk's tokens) over its own
sequence's cached keys and values. Each (row, kv head) pair is one parallel task that streams that sequence's
keys and values once, for all the query heads that share them, and reads only the positions the row has (no
padding to the longest sequence in the batch, no mask). Measured here against torch's batched matmuls over the
padded cache (16 decode rows, 40-270 positions, 30 layers, cold cache): 262 against 677 us a layer; one row:
6.4 against 22.3 us for scaled_dot_product_attention. A row's result depends on its own inputs only, so neither
batching, nor how a prompt is cut into chunks, nor a reused prefix changes it (torch's attention over a chunk
sums in an order that depends on the chunk's length)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from shared.backends.kernels.isa import dot_kernels
from shared.backends.kernels.llvm import F32, I16, fast_exp, float_lanes, i64, splat, vector_fma

KEY_BLOCK = 32  # positions of a block of keys, stored position-minor: one 64-byte line per dimension (float16)
HALF_MAX = 65504.0  # the largest finite float16: the cache clamps to it rather than store an infinity


def _half_bits_typer(typingctx: Any, x: Any) -> Any:
    """The bits of float32 x rounded to float16 (to nearest even; LLVM's fptrunc, vcvtps2ph on x86)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), I16)

    return types.uint16(types.float32), codegen


_half_bits: Callable[..., Any] = intrinsic(_half_bits_typer)


def _vector_registers() -> tuple[int, int]:
    """The float32 lanes of a vector register and how many there are, on the CPU numba compiles for: AVX-512's
    32 of 16, AVX2's 16 of 8 (dot_kernels()); elsewhere taken as AVX-512's (LLVM splits the vectors)."""
    return (8, 16) if dot_kernels() == "avx2" else (16, 32)


def _key_block_codegen(dim: int, group: int, half: bool) -> Callable[..., Any]:
    """_key_block(keys, at, q, scores, column, scale, dim, group, half), the last three constants:
    scores[g, column + j] = scale * q[g] . key j of the block of KEY_BLOCK keys at keys[at:], for the `group`
    query heads that share them (see attention).

    The block holds dimension d of its 32 keys at [32 d, 32 d + 32), so each step broadcasts one query value
    and multiplies it by the keys' values: no sums across lanes. With a few query heads the even and odd
    dimensions sum into their own registers (twice the independent chains of fused multiply-adds), added at
    the end; the order is fixed, so a score depends on its own row's inputs only. The sums stay in registers:
    the block's keys in passes of as many as three quarters of the CPU's vector registers hold (all 32 with
    AVX-512's 32 registers; 16 or 8 with AVX2's 16, whose sums of all 32 spilled to memory at every step), each
    key's sum the same either way."""
    chains = 2 if group <= 4 else 1
    lanes, registers = _vector_registers()
    vector = ir.VectorType(F32, lanes)
    per_pass = next(
        (n for n in (KEY_BLOCK, 16, 8) if group * chains * (n // lanes) <= registers * 3 // 4), min(KEY_BLOCK, lanes)
    )

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        keys_, q_, scores_ = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3))
        at_, column_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 4))
        fma = vector_fma(builder, lanes)
        base = builder.gep(keys_.data, [at_])
        width = cgutils.unpack_tuple(builder, scores_.shape, 2)[1]
        scale_ = splat(builder, context.cast(builder, args[5], signature.args[5], types.float32), vector)
        zeros = ir.Constant(vector, [0.0] * lanes)
        for first in range(0, KEY_BLOCK, per_pass):
            part = range(first, first + per_pass, lanes)  # the pass's vectors, by their first key
            acc = [[[zeros] * chains for _ in part] for _ in range(group)]
            for d in range(dim):
                keys = [float_lanes(builder, base, i64(KEY_BLOCK * d + j), lanes, half) for j in part]
                for g in range(group):
                    value = splat(builder, builder.load(builder.gep(q_.data, [i64(g * dim + d)])), vector)
                    for v, key in enumerate(keys):
                        acc[g][v][d % chains] = builder.call(fma, [value, key, acc[g][v][d % chains]])
            for g in range(group):
                row = builder.add(builder.mul(i64(g), width), column_)
                for v, j in enumerate(part):
                    total = acc[g][v][0]
                    for chain in acc[g][v][1:]:
                        total = builder.fadd(total, chain)
                    at = builder.gep(scores_.data, [builder.add(row, i64(j))])
                    builder.store(builder.fmul(total, scale_), builder.bitcast(at, vector.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _key_block_typer(
    typingctx: Any, keys: Any, at: Any, q: Any, scores: Any, column: Any, scale: Any, dim: Any, group: Any, half: Any
) -> Any:
    if not all(isinstance(t, types.Literal) for t in (dim, group, half)):
        return None  # typed again with their values: the code is made for them
    sig = types.void(keys, at, q, scores, column, scale, dim, group, half)
    return sig, _key_block_codegen(dim.literal_value, group.literal_value, half.literal_value)


_key_block: Callable[..., None] = intrinsic(prefer_literal=True)(_key_block_typer)


def _value_rows_codegen(dim: int, group: int, half: bool) -> Callable[..., Any]:
    """_value_rows(values, at, n, weights, column, out, r, query, dim, group, half), the last three constants:
    out[r, query + g dim : query + (g + 1) dim] = sum over p < n of weights[g, column + p] * the value at
    values[at + p dim:], for each of the `group` query heads, in position order (see attention). The sums stay
    in registers: a slice of the vectors across the query heads at a time, as many as the CPU's registers hold
    beside the slice's values (AVX2's 16 registers of 8 lanes take fewer than AVX-512's 32 of 16)."""
    register_lanes, registers = _vector_registers()
    lanes = next(w for w in (16, 8, 4, 2, 1) if dim % w == 0 and w <= register_lanes)
    vectors = dim // lanes
    per_slice = max(1, min(vectors, (registers - 2) // (group + 1)))
    vector = ir.VectorType(F32, lanes)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        values_, weights_, out_ = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3, 5))
        at_, n_, column_, r_, query_ = (
            context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 4, 6, 7)
        )
        fma = vector_fma(builder, lanes)
        width = cgutils.unpack_tuple(builder, weights_.shape, 2)[1]
        out_width = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
        zeros = ir.Constant(vector, [0.0] * lanes)
        for first in range(0, vectors, per_slice):
            part = range(first, min(vectors, first + per_slice))
            acc = [[cgutils.alloca_once_value(builder, zeros) for _ in part] for _ in range(group)]
            with cgutils.for_range(builder, n_) as loop:
                p = loop.index
                row = builder.add(at_, builder.mul(p, i64(dim)))
                loaded = [
                    float_lanes(builder, values_.data, builder.add(row, i64(lanes * c)), lanes, half) for c in part
                ]
                for g in range(group):
                    at = builder.add(builder.mul(i64(g), width), builder.add(column_, p))
                    w = splat(builder, builder.load(builder.gep(weights_.data, [at])), vector)
                    for slot, value in zip(acc[g], loaded, strict=True):
                        builder.store(builder.call(fma, [w, value, builder.load(slot)]), slot)
            for g in range(group):
                for slot, c in zip(acc[g], part, strict=True):
                    index = builder.add(builder.mul(r_, out_width), builder.add(query_, i64(g * dim + lanes * c)))
                    at = builder.bitcast(builder.gep(out_.data, [index]), vector.as_pointer())
                    builder.store(builder.load(slot), at, align=4)
        return context.get_dummy_value()

    return codegen


def _value_rows_typer(
    typingctx: Any,
    values: Any,
    at: Any,
    n: Any,
    weights: Any,
    column: Any,
    out: Any,
    r: Any,
    query: Any,
    dim: Any,
    group: Any,
    half: Any,
) -> Any:
    if not all(isinstance(t, types.Literal) for t in (dim, group, half)):
        return None  # typed again with their values: the code is made for them
    sig = types.void(values, at, n, weights, column, out, r, query, dim, group, half)
    return sig, _value_rows_codegen(dim.literal_value, group.literal_value, half.literal_value)


_value_rows: Callable[..., None] = intrinsic(prefer_literal=True)(_value_rows_typer)


@njit(inline="always")
def _to_cache(x: np.float32, half: bool) -> Any:
    """A value as the cache keeps it: float16 bits clamped to float16's finite range, or float32."""
    if half:
        top = np.float32(HALF_MAX)
        return _half_bits(min(max(x, -top), top))
    return x


@functools.cache
def attention(dim: int, group: int, half: bool = True) -> Callable[..., None]:
    """The kernel for heads of `dim` floats, `group` query heads to a kv head: rotary embedding, the cache write
    and causal attention of one step's rows, decode and prompt alike, called as
    kernel(qkv, cos, signed_sin, slots, positions, k, v, out, scale, window).

    qkv: (N, (H + 2K) * D), each row's projections as the qkv matmul gives them: H query heads, then K key
    heads, then K value heads. Row r is a token of the sequence in cache slot slots[r] at position
    positions[r]; rows of one sequence (a prompt chunk) come in position order. First every row's key and value
    are rotated and stored at its position of k, v: one layer's cache; then each row's query heads attend over
    positions 0..positions[r] of its slot, or only the last `window` of them when window > 0 (a sliding-window
    layer). out: (N, H * D). Query head h reads kv head h // group. cos, signed_sin: (P, D), the rotate-half
    tables: x * cos + (x2, x1) * signed_sin.

    The cache is float16 (uint16 arrays of its bits: numba has no float16) clamped to float16's range, or float32
    with half=False (exact); (S, K, P, D), P a multiple of KEY_BLOCK. Values are stored as that shape says, a
    position's D values together; keys in blocks of KEY_BLOCK positions, each (D, KEY_BLOCK): dimension d of the
    block's keys together (key_index). So a row's scores come 32 positions at a time without sums across lanes,
    and its values a position at a time, through LLVM vector code (_key_block, _value_rows: numba's loops summed
    across lanes at every position and kept the sums in memory), and the softmax's exponentials are vectorised
    (fast_exp). A 16-row decode step reads each row's cache once, so float16's half of the bytes counts too.

    A row's result is computed by the same instructions in the same order whatever else is in the call: a
    block's lanes past the row's own positions are computed and dropped. So a token gets the same bits as a
    decode row, inside a prompt chunk of any length, or after a reused prefix.
    """
    rotate = dim // 2

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def kernel(
        qkv: np.ndarray,
        cos: np.ndarray,
        signed_sin: np.ndarray,
        slots: np.ndarray,
        positions: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        out: np.ndarray,
        scale: np.float32,
        window: int,
    ) -> None:
        rows = qkv.shape[0]
        kv_heads = k.shape[1]
        heads = out.shape[1] // dim
        keys = k.reshape((k.shape[0], kv_heads, k.shape[2] * dim))
        values = v.reshape((v.shape[0], kv_heads, v.shape[2] * dim))
        for task in range(rows * kv_heads):  # a few thousand stores: one parallel region less a layer (~15 us)
            r = task // kv_heads
            h = task - r * kv_heads
            slot, pos = slots[r], positions[r]
            key, value = (heads + h) * dim, (heads + kv_heads + h) * dim
            at = key_index(pos, dim)
            for d in range(rotate):
                x = qkv[r, key + d] * cos[pos, d] + qkv[r, key + d + rotate] * signed_sin[pos, d]
                keys[slot, h, at + d * KEY_BLOCK] = _to_cache(x, half)
            for d in range(rotate, dim):
                x = qkv[r, key + d] * cos[pos, d] + qkv[r, key + d - rotate] * signed_sin[pos, d]
                keys[slot, h, at + d * KEY_BLOCK] = _to_cache(x, half)
            for d in range(dim):
                values[slot, h, pos * dim + d] = _to_cache(qkv[r, value + d], half)
        for task in prange(rows * kv_heads):
            r = task // kv_heads
            h = task - r * kv_heads
            slot, pos = slots[r], positions[r]
            first = max(0, pos - window + 1) if window > 0 else 0
            n = pos + 1 - first
            q = np.empty((group, dim), np.float32)
            for g in range(group):
                query = (h * group + g) * dim
                for d in range(rotate):
                    q[g, d] = qkv[r, query + d] * cos[pos, d] + qkv[r, query + d + rotate] * signed_sin[pos, d]
                for d in range(rotate, dim):
                    q[g, d] = qkv[r, query + d] * cos[pos, d] + qkv[r, query + d - rotate] * signed_sin[pos, d]
            start = first // KEY_BLOCK * KEY_BLOCK
            skip = first - start  # the first block's positions before the window
            scores = np.empty((group, (pos // KEY_BLOCK + 1) * KEY_BLOCK - start), np.float32)
            for b in range(0, scores.shape[1], KEY_BLOCK):
                _key_block(keys[slot, h], (start + b) * dim, q, scores, b, scale, dim, group, half)
            for g in range(group):
                top = scores[g, skip]
                for p in range(1, n):
                    top = max(top, scores[g, skip + p])
                total = np.float32(0.0)
                for p in range(n):
                    e = fast_exp(scores[g, skip + p] - top)
                    scores[g, skip + p] = e
                    total += e
                for p in range(n):
                    scores[g, skip + p] /= total
            _value_rows(values[slot, h], first * dim, n, scores, skip, out, r, h * group * dim, dim, group, half)

    _ATTENTION[(dim, group, half)] = kernel
    return kernel


_ATTENTION: dict[tuple[int, int, bool], Any] = {}  # attention's kernels made in this process, by their arguments


def made_kernels() -> dict[tuple[int, int, bool], Any]:
    """attention's kernels made in this process, by their arguments."""
    return dict(_ATTENTION)


@njit(inline="always")
def key_index(position: int, dim: int) -> int:
    """Where dimension 0 of the key at `position` is in a (slot, kv head)'s keys, flattened (see attention):
    dimension d is KEY_BLOCK d further."""
    block = position // KEY_BLOCK
    return block * dim * KEY_BLOCK + position - block * KEY_BLOCK
