"""numba kernels of the batched Llama runner on CPU, compiled on first use and cached on disk.

attention: every row of a step (a decode token per sequence, and a prompt chunk's tokens) over its own
sequence's cached keys and values. Each (row, kv head) pair is one parallel task that streams that sequence's
keys and values once, for all the query heads that share them, and reads only the positions the row has (no
padding to the longest sequence in the batch, no mask). Measured here against torch's batched matmuls over the
padded cache (16 decode rows, 40-270 positions, 30 layers, cold cache): 262 against 677 us a layer; one row:
6.4 against 22.3 us for scaled_dot_product_attention. A row's result depends on its own inputs only, so neither
batching, nor how a prompt is cut into chunks, nor a reused prefix changes it (torch's attention over a chunk
sums in an order that depends on the chunk's length).

quantize_rows: the int8 matmuls' inputs, row by row.

rms_norm: RMSNorm of rows, one call instead of the composite of ~6 ops torch runs on CPU.

int4_matmul: rows times 4-bit weights by AVX-512 BF16's dot products, where the CPU has them (int4_dot_supported).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

log = logging.getLogger(__name__)

KERNELS_DIR = "kernels"  # the folder of the cache dir (FNSERVE_CACHE_DIR) an image's build compiles kernels into
PREFETCH_AHEAD = 8  # positions: measured best of 4, 8 and 16
LINE_FLOATS = 16  # float32s in a 64-byte cache line


def _prefetch(typingctx: Any, array: Any, i: Any, j: Any, p: Any, d: Any) -> Any:
    """Ask the CPU to bring the cache line of array[i, j, p, d] (a 4-D array) into its caches, without waiting
    for it (LLVM's prefetch: a read, kept close). It changes no value, only when memory is read."""
    sig = types.void(array, i, j, p, d)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, a, t, types.intp) for a, t in zip(args[1:], signature.args[1:], strict=True)]
        item = cgutils.get_item_pointer(context, builder, array_type, view, index)
        pointer = builder.bitcast(item, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32])
        fetch = cgutils.get_or_insert_function(builder.module, function, "llvm.prefetch.p0")
        builder.call(fetch, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


prefetch: Callable[..., None] = intrinsic(_prefetch)


@functools.cache
def attention(dim: int) -> Callable[..., None]:
    """The kernel for heads of `dim` floats: rotary embedding, the cache write and causal attention of one step's
    rows, decode and prompt alike, called as kernel(qkv, cos, signed_sin, slots, positions, k, v, out, scale, window).

    qkv: (N, (H + 2K) * D), each row's projections as the qkv matmul gives them: H query heads, then K key
    heads, then K value heads. Row r is a token of the sequence in cache slot slots[r] at position
    positions[r]; rows of one sequence (a prompt chunk) come in position order. First every row's key and value
    are rotated and stored at its position of k, v: (S, K, P, D), one layer's cache; then each row's query
    heads attend over positions 0..positions[r] of its slot, or only the last `window` of them when window > 0
    (a sliding-window layer). out: (N, H * D). Query head h reads kv head h // (H / K). cos, signed_sin: (P, D),
    the rotate-half tables: x * cos + (x2, x1) * signed_sin.

    A row's result is computed by the same loops in the same order whatever else is in the call, so a token
    gets the same bits as a decode row, inside a prompt chunk of any length, or after a reused prefix.

    `dim` is a constant to LLVM, so every loop over a head is unrolled, with no trip count to test (measured 16
    decode rows, ~180 positions, warm cache: 149 against 172 us a layer). Each head size is compiled once, and
    cached on disk like the other kernels; the runner asks for its kernel once, at load.

    The loop over positions asks the CPU for the keys PREFETCH_AHEAD positions on and for this position's values
    (`prefetch`), so a decode row, whose sequence's keys and values come from memory rather than the caches,
    waits less for them (16 rows, 30 layers' caches in turn: 208 against 258 us a layer). Prefetches change no
    value: a row's bits depend on its own inputs only, as before.
    """
    half = dim // 2

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
        group = heads // kv_heads
        for task in range(rows * kv_heads):  # a few thousand stores: one parallel region less a layer (~15 us)
            r = task // kv_heads
            h = task - r * kv_heads
            slot, pos = slots[r], positions[r]
            key, value = (heads + h) * dim, (heads + kv_heads + h) * dim
            for d in range(half):
                k[slot, h, pos, d] = qkv[r, key + d] * cos[pos, d] + qkv[r, key + d + half] * signed_sin[pos, d]
            for d in range(half, dim):
                k[slot, h, pos, d] = qkv[r, key + d] * cos[pos, d] + qkv[r, key + d - half] * signed_sin[pos, d]
            for d in range(dim):
                v[slot, h, pos, d] = qkv[r, value + d]
        for task in prange(rows * kv_heads):
            r = task // kv_heads
            h = task - r * kv_heads
            slot, pos = slots[r], positions[r]
            first = max(0, pos - window + 1) if window > 0 else 0
            n = pos + 1 - first
            q = np.empty((group, dim), np.float32)
            for g in range(group):
                query = (h * group + g) * dim
                for d in range(half):
                    q[g, d] = qkv[r, query + d] * cos[pos, d] + qkv[r, query + d + half] * signed_sin[pos, d]
                for d in range(half, dim):
                    q[g, d] = qkv[r, query + d] * cos[pos, d] + qkv[r, query + d - half] * signed_sin[pos, d]
            scores = np.empty((group, n), np.float32)
            for p in range(n):
                for d in range(0, dim, LINE_FLOATS):  # the keys a few positions on, and this position's values
                    if p + PREFETCH_AHEAD < n:
                        prefetch(k, slot, h, first + p + PREFETCH_AHEAD, d)
                    prefetch(v, slot, h, first + p, d)
                for g in range(group):
                    acc = np.float32(0.0)
                    for d in range(dim):
                        acc += q[g, d] * k[slot, h, first + p, d]
                    scores[g, p] = acc * scale
            for g in range(group):
                top = scores[g, 0]
                for p in range(1, n):
                    top = max(top, scores[g, p])
                total = np.float32(0.0)
                for p in range(n):
                    e = math.exp(scores[g, p] - top)
                    scores[g, p] = e
                    total += e
                for p in range(n):
                    scores[g, p] /= total
            acc_out = np.zeros((group, dim), np.float32)
            for p in range(n):
                for g in range(group):
                    w = scores[g, p]
                    for d in range(dim):
                        acc_out[g, d] += w * v[slot, h, first + p, d]
            for g in range(group):
                query = (h * group + g) * dim
                for d in range(dim):
                    out[r, query + d] = acc_out[g, d]

    return kernel


@njit(fastmath=True, nogil=True, cache=True)
def quantize_rows(x: np.ndarray, top: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Each row of x (N, K) float32 to unsigned 8 bits with its own scale: (top + 1 + round(x / s) as uint8,
    s (N, 1)), s = max |x| / top over the row, so the values lie in 1..2 top + 1.

    top 127 uses all 8 bits; 63 keeps 7, for CPUs whose int8 instructions sum pairs of products in 16 bits
    (see INT8_INPUT_TOP in llama.py). One call instead of the seven torch ops it takes (abs, amax, scale, clamp,
    divide and shift, round, cast): 7.6 against 24.5 us for 16 x 576 here, which at four matmul inputs a layer
    is ~2 ms of a 16-row decode step.
    """
    n, k = x.shape
    q = np.empty((n, k), np.uint8)
    s = np.empty((n, 1), np.float32)
    for i in range(n):
        peak = np.float32(0.0)
        for j in range(k):
            peak = max(peak, abs(x[i, j]))
        scale = max(peak / np.float32(top), np.float32(1e-10))
        inv = np.float32(1.0) / scale
        for j in range(k):
            q[i, j] = np.uint8(np.int32(np.rint(x[i, j] * inv)) + top + 1)
        s[i, 0] = scale
    return q, s


@njit(fastmath=True, nogil=True, cache=True)
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """weight * x / sqrt(mean(x ** 2) + eps) for each row of x (N, C), float32, as Llama's RMSNorm.

    torch's CPU rms_norm is a composite of ~6 ops, 17 us a call at one row here: 1 ms of a 5.5 ms int4 step.
    """
    n, c = x.shape
    out = np.empty((n, c), np.float32)
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(c):
            acc += x[i, j] * x[i, j]
        inv = np.float32(1.0) / np.sqrt(acc / np.float32(c) + eps)
        for j in range(c):
            out[i, j] = weight[j] * (x[i, j] * inv)
    return out


def seed_cache(prebuilt: Path) -> None:
    """Copy kernels compiled ahead of time (an image's build runs `fnserve prepare` with NUMBA_CACHE_DIR there)
    into numba's cache directory, where they are found instead of compiled (~2.4 s of a cold start here).

    numba reads its cache only from a directory it can write, so an image's read-only copy is seeded into
    the writable one (NUMBA_CACHE_DIR, /tmp in the images) at each start; files already there stay as they are.
    Nothing to do when numba caches beside the sources (no NUMBA_CACHE_DIR) or there is nothing prebuilt. The
    kernels are found only where they were compiled for this CPU (NUMBA_CPU_NAME, see docs/deploy.md).
    """
    target = getattr(numba.config, "CACHE_DIR", None)  # NUMBA_CACHE_DIR, read when numba was imported
    if not target or not prebuilt.is_dir() or Path(target).resolve() == prebuilt.resolve():
        return
    try:
        for source in prebuilt.rglob("*"):
            copy = Path(target) / source.relative_to(prebuilt)
            if source.is_dir():
                copy.mkdir(parents=True, exist_ok=True)
            elif not copy.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, copy)
    except OSError as exc:  # the kernels compile as they would have without it
        log.warning("could not copy the prebuilt kernels from %s to %s: %s", prebuilt, target, exc)


INT4_TILE_ROWS = 8  # rows of one int4 task: each decoded weight serves 8 rows (8 x 16 columns fit the registers)


class _BFloat16(ir.Type):
    """LLVM's bfloat, which llvmlite's IR builder does not name; AVX-512 BF16's dot product takes vectors of it."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat16)

    def __hash__(self) -> int:
        return hash("bfloat")


_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16F, _V16I, _V32H, _V32BF = (ir.VectorType(t, n) for t, n in ((_F32, 16), (_I32, 16), (_I16, 32), (_BFloat16(), 32)))
_V32I, _V32F, _V32B = ir.VectorType(_I32, 32), ir.VectorType(_F32, 32), ir.VectorType(_I8, 32)
# bfloat16 bits of q - 8 for a 4-bit q, twice: vpermw reads 5 bits of each index, and the fifth is the other nibble's
_NIBBLE_VALUES = [int(np.float32(q % 16 - 8).view(np.uint32)) >> 16 for q in range(32)]


def int4_dot_supported() -> bool:
    """Whether this process compiles numba's kernels for a CPU with AVX-512 BF16 (its bfloat16 dot product) and
    AVX-512 BW (vpermw), which int4_matmul needs. Kernels compiled for another CPU (an image's NUMBA_CPU_NAME)
    never use it."""
    from llvmlite import binding

    if getattr(numba.config, "CPU_NAME", None) not in (None, "host"):
        return False
    features = binding.get_host_cpu_features()
    return all(features.get(f) for f in ("avx512f", "avx512bw", "avx512bf16"))


def _i64(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _splat(builder: Any, value: Any, vector: Any) -> Any:
    """value in every lane of a vector of its type."""
    lanes = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(_I32, vector.count), [0] * vector.count))


def _load(builder: Any, base: Any, index: Any, vector: Any, align: int) -> Any:
    """The vector at base[index] (base: a pointer to its lanes' type)."""
    return builder.load(builder.bitcast(builder.gep(base, [index]), vector.as_pointer()), align=align)


def _int4_tile(rows: int) -> Callable[..., None]:
    """tile(pairs, sums, quads, sz, out, r0, block): out[r0 : r0 + rows, 16 block : 16 block + 16] (see
    int4_matmul), as LLVM vector code: numba vectorised no form of it (scalar loads and byte inserts)."""

    def typer(typingctx: Any, pairs: Any, sums: Any, quads: Any, sz: Any, out: Any, r0: Any, block: Any) -> Any:
        sig = types.void(pairs, sums, quads, sz, out, r0, block)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrays = (
                context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:5], args[:5], strict=True)
            )
            pairs_, sums_, quads_, sz_, out_ = arrays
            first, block = (
                context.cast(builder, a, t, types.intp) for a, t in zip(args[5:], signature.args[5:], strict=True)
            )
            width = cgutils.unpack_tuple(builder, pairs_.shape, 2)[1]  # K / 2: bfloat16 pairs a row
            n = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
            groups = builder.udiv(width, _i64(16))
            module = builder.module
            dot = cgutils.get_or_insert_function(
                module, ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF]), "llvm.x86.avx512bf16.dpbf16ps.512"
            )
            permute = cgutils.get_or_insert_function(
                module, ir.FunctionType(_V32H, [_V32H, _V32H]), "llvm.x86.avx512.permvar.hi.512"
            )
            fma = cgutils.get_or_insert_function(module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
            column = builder.mul(block, _i64(16))
            x_rows = builder.gep(pairs_.data, [builder.mul(first, width)])
            sum_rows = builder.gep(sums_.data, [builder.mul(first, groups)])
            block_quads = builder.gep(quads_.data, [builder.mul(block, builder.mul(width, _i64(16)))])
            scales = builder.bitcast(sz_.data, ir.PointerType(_I16))
            zeros = ir.Constant(_V16F, [0.0] * 16)
            totals = [cgutils.alloca_once_value(builder, zeros) for _ in range(rows)]
            dots = [cgutils.alloca_once_value(builder, zeros) for _ in range(rows)]

            def pair(r: int, index: Any) -> Any:
                """Inputs 2 index and 2 index + 1 of row r, as a bfloat16 pair in every lane."""
                x = builder.load(builder.gep(x_rows, [builder.add(builder.mul(_i64(r), width), index)]))
                return builder.bitcast(_splat(builder, x, _V16I), _V32BF)

            with cgutils.for_range(builder, groups) as group_loop:
                g = group_loop.index
                for acc in dots:
                    builder.store(zeros, acc)
                with cgutils.for_range(builder, _i64(8)) as step_loop:  # 4 inputs a step, 32 a group
                    step = builder.add(builder.mul(g, _i64(8)), step_loop.index)
                    # word 2j + h: column j's inputs 4 step + h (low nibble) and 4 step + h + 2 (high nibble)
                    words = builder.zext(_load(builder, block_quads, builder.mul(step, _i64(32)), _V32B, 1), _V32H)
                    low = builder.bitcast(builder.call(permute, [ir.Constant(_V32H, _NIBBLE_VALUES), words]), _V32BF)
                    shifted = builder.lshr(words, ir.Constant(_V32H, [4] * 32))
                    high = builder.bitcast(builder.call(permute, [ir.Constant(_V32H, _NIBBLE_VALUES), shifted]), _V32BF)
                    index = builder.mul(step, _i64(2))
                    for r, acc in enumerate(dots):
                        partial = builder.call(dot, [builder.load(acc), pair(r, index), low])
                        builder.store(builder.call(dot, [partial, pair(r, builder.add(index, _i64(1))), high]), acc)
                at = builder.mul(builder.add(builder.mul(g, n), column), _i64(2))  # sz[g, column]: scale, zero pairs
                bits = builder.zext(_load(builder, scales, at, _V32H, 2), _V32I)
                both = builder.bitcast(builder.shl(bits, ir.Constant(_V32I, [16] * 32)), _V32F)
                scale = builder.shuffle_vector(both, both, ir.Constant(_V16I, list(range(0, 32, 2))))
                zero = builder.shuffle_vector(both, both, ir.Constant(_V16I, list(range(1, 32, 2))))
                for r, (acc, total) in enumerate(zip(dots, totals, strict=True)):
                    group_sum = builder.load(builder.gep(sum_rows, [builder.add(builder.mul(_i64(r), groups), g)]))
                    scaled = builder.call(fma, [scale, builder.load(acc), builder.load(total)])
                    builder.store(builder.call(fma, [zero, _splat(builder, group_sum, _V16F), scaled]), total)
            for r, total in enumerate(totals):
                at = builder.gep(out_.data, [builder.add(builder.mul(builder.add(first, _i64(r)), n), column)])
                builder.store(builder.load(total), builder.bitcast(at, _V16F.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


_tile1, _tile2, _tile4, _tile8 = (_int4_tile(rows) for rows in (1, 2, 4, INT4_TILE_ROWS))


@njit(inline="always")
def _bfloat16_bits(bits: np.uint32) -> np.uint32:
    """A float32's bits rounded to bfloat16's, to nearest even as torch rounds them (a NaN to 0x7FC0), in the
    high half."""
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.uint32(0x7FC00000) if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc"})
def int4_matmul(x: np.ndarray, quads: np.ndarray, sz: np.ndarray, n: int) -> np.ndarray:
    """x (M, K) float32 times 4-bit weights (N, K), float32 (M, N), where the CPU has AVX-512 BF16
    (int4_dot_supported). quads, sz: a plane of shared.backends.llama's _dot_plane (w = (q - 8) * scale + zero
    in groups of 32 inputs).

    x is rounded to bfloat16 first (as torch's int4 kernel takes it), each group's sum of those inputs taken (the
    zero points' share; `reassoc` lets LLVM vectorise this sum, in an order fixed by the code, so a row's sum
    depends on its own inputs only). Then each task is INT4_TILE_ROWS rows by 16 columns (the last rows in tiles
    of 4, 2 and 1). For each group it decodes the 4-bit values, two steps of 32 at a time (a byte each, widened
    to words, looked up as bfloat16 q - 8 by vpermw: exact), takes their dot products with the rows' inputs by
    vdpbf16ps (products exact, summed in float32), then adds scale * dot + zero * (the group's sum of the
    inputs). A row's result comes from the same instructions in the same order whatever the other rows are, so it
    does not depend on its batch.
    """
    m, k = x.shape
    bits = x.view(np.uint32)
    rounded = np.empty((m, k), np.uint32)  # x in bfloat16, as float32 bits
    for i in range(m):
        for j in range(k):
            rounded[i, j] = _bfloat16_bits(bits[i, j])
    pairs = np.empty((m, k // 2), np.uint32)  # inputs 2j and 2j + 1 as one bfloat16 pair
    for i in range(m):
        for j in range(k // 2):
            pairs[i, j] = (rounded[i, 2 * j] >> np.uint32(16)) | rounded[i, 2 * j + 1]
    values = rounded.view(np.float32)
    groups = k // 32
    sums = np.empty((m, groups), np.float32)
    for i in range(m):
        for g in range(groups):
            acc = np.float32(0.0)
            for j in range(32):
                acc += values[i, g * 32 + j]
            sums[i, g] = acc
    out = np.empty((m, n), np.float32)
    blocks = (m + INT4_TILE_ROWS - 1) // INT4_TILE_ROWS
    for task in prange(n // 16 * blocks):
        block = task // blocks
        r0 = (task - block * blocks) * INT4_TILE_ROWS
        rows = min(INT4_TILE_ROWS, m - r0)
        if rows == INT4_TILE_ROWS:
            _tile8(pairs, sums, quads, sz, out, r0, block)
        else:  # the last rows: tiles of 4, 2 and 1
            if rows & 4:
                _tile4(pairs, sums, quads, sz, out, r0, block)
            if rows & 2:
                _tile2(pairs, sums, quads, sz, out, r0 + (rows & 4), block)
            if rows & 1:
                _tile1(pairs, sums, quads, sz, out, r0 + (rows & 6), block)
    return out
