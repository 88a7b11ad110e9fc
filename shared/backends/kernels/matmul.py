"""Rows times quantized weights: int4_matmul (AVX-512 BF16's dot products), int4_a8_matmul (rows at 8 bits
times 4-bit weights) and int8_matmul (rows at 16 bits times 8-bit weights) by integer dot products, AVX-512
VNNI's or AVX2's (dot_kernels), and the rows' quantization they take (quantize_inputs, quantize_words)."""

from __future__ import annotations

import numpy as np
from numba import njit

from shared.backends.kernels.tiles import INT4_TILE_ROWS, INT8_TILE_ROWS, int4_a8_tile, int4_tile, int8_tile, tiled

_int4_tiles = tiled(tuple(int4_tile(rows) for rows in (1, 2, 4, 8, 8)), INT4_TILE_ROWS)
_int8_tiles = tiled(tuple(int8_tile(rows) for rows in (1, 2, 4, 8, INT8_TILE_ROWS)), INT8_TILE_ROWS)
_int4_a8_tiles = tiled(tuple(int4_a8_tile(rows) for rows in (1, 2, 4, 8, 8)), INT4_TILE_ROWS)


@njit(inline="always")
def _bfloat16_bits(bits: np.uint32) -> np.uint32:
    """A float32's bits rounded to bfloat16's, to nearest even as torch rounds them (a NaN to 0x7FC0), in the
    high half."""
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.uint32(0x7FC00000) if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded


@njit(nogil=True, cache=True, fastmath={"reassoc"})
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
    _int4_tiles(pairs, sums, quads, sz, out)
    return out


@njit(nogil=True, cache=True)
def int8_matmul(x: np.ndarray, weights: np.ndarray, scales: np.ndarray, n: int) -> np.ndarray:
    """x (M, K) float32 times 8-bit weights (N, K), float32 (M, N), where dot_kernels() has a kernel. weights,
    scales: shared.backends.llama's _int8_plane (w = q * scale, q in -127..127, in groups of 32 inputs: GGUF's
    Q8_0).

    Each group of 32 inputs of a row is quantized to 16 bits (quantize_words: within 1/65534 of the group's
    largest value, where bfloat16 rounds each input within 1/512 of itself); each task is INT8_TILE_ROWS rows by
    16 columns; for each group it widens the weights to 16 bits, 32 at a time (two inputs of 16 columns), takes
    their integer dot products with the rows' inputs (vpdpwssd, or AVX2's pmaddwd: exact in int32) and adds
    scale * step * dot. One pass over the 8-bit values. A row's result does not depend on its batch.
    """
    q, steps = quantize_words(x)
    out = np.empty((x.shape[0], n), np.float32)
    _int8_tiles(q.view(np.uint32), steps, weights, scales, out)
    return out


@njit(inline="always")
def _group_top(x: np.ndarray, i: int, g: int) -> np.float32:
    """The largest magnitude of row i's inputs g * 32 .. g * 32 + 31."""
    top = np.float32(0.0)
    for j in range(g * 32, g * 32 + 32):
        top = max(top, abs(x[i, j]))
    return top


@njit(nogil=True, cache=True, fastmath=True)
def quantize_words(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) float32 to 16 bits in groups of 32 inputs: q (M, K) int16 = round(x / step), step = the group's
    largest magnitude / 32767; and the steps (M, K/32) float32."""
    m, k = x.shape
    groups = k // 32
    q = np.empty((m, k), np.int16)
    steps = np.empty((m, groups), np.float32)
    for i in range(m):
        for g in range(groups):
            top = _group_top(x, i, g)
            inverse = np.float32(32767.0) / top if top > 0 else np.float32(0.0)
            for j in range(g * 32, g * 32 + 32):
                q[i, j] = min(max(np.rint(x[i, j] * inverse), np.float32(-32767.0)), np.float32(32767.0))
            steps[i, g] = top / np.float32(32767.0)
    return q, steps


@njit(nogil=True, cache=True, fastmath=True)
def quantize_inputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) float32 to 8 bits in groups of 32 inputs, as llama.cpp's Q8_1 activations: q (M, K) int8 =
    round(x / step), step = the group's largest magnitude / 127; and (M, K/32, 2) float32: each group's step and
    the sum of its 8-bit inputs times the step (the zero points' share: the sum of the inputs as quantized, so that
    a group's rounding errors meet its centred weights, not its 0..15 values alone)."""
    m, k = x.shape
    groups = k // 32
    q = np.empty((m, k), np.int8)
    steps = np.empty((m, groups, 2), np.float32)
    for i in range(m):
        for g in range(groups):
            top = _group_top(x, i, g)
            inverse = np.float32(127.0) / top if top > 0 else np.float32(0.0)
            total = np.int32(0)
            for j in range(g * 32, g * 32 + 32):
                value = np.int32(np.rint(x[i, j] * inverse))
                q[i, j] = value
                total += value
            step = top / np.float32(127.0)
            steps[i, g, 0] = step
            steps[i, g, 1] = np.float32(total) * step
    return q, steps


@njit(nogil=True, cache=True)
def int4_a8_matmul(x: np.ndarray, nibbles: np.ndarray, scales: np.ndarray, n: int) -> np.ndarray:
    """x (M, K) float32 times 4-bit weights (N, K), float32 (M, N), with x at 8 bits, where dot_kernels() has a
    kernel (AVX-512 VNNI or AVX2). nibbles, scales: shared.backends.llama's _a8_plane (w = q * scale + low in groups
    of 32 inputs, q 0..15: GGUF's Q4_1).

    llama.cpp's arithmetic for Q4_1 weights: each group of 32 inputs of a row is quantized to 8 bits with its own
    step (quantize_inputs); each task is INT4_TILE_ROWS rows by 16 columns; for each group it splits 64 bytes
    into two steps' 4-bit values (an `and` and a shift: 128 weights), takes their integer dot products with the
    rows' 8-bit inputs by vpdpbusd (4 products a lane, exact in int32; AVX2: see int4_a8_tile), then adds
    scale * step * dot + low * (the group's sum of the 8-bit inputs times the step). An instruction multiplies 64
    pairs where vdpbf16ps multiplies 32, and the decoding costs a third as much. A row's result does not depend
    on its batch.
    """
    q, steps = quantize_inputs(x)
    out = np.empty((x.shape[0], n), np.float32)
    _int4_a8_tiles(q.view(np.int32), steps, nibbles, scales, out)
    return out
