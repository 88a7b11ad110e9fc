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

rms_norm: RMSNorm of rows, one call instead of the composite of ~6 ops torch runs on CPU; add_rms_norm: a block's
output added to the residual stream and the sum's RMSNorm, one call where numpy's add and rms_norm took two.

gated: the MLP's activation (SiLU, or Gemma's GELU) times its up projection, one call instead of numpy's five.

int4_matmul: rows times 4-bit weights by AVX-512 BF16's dot products, where the CPU has them (int4_dot_supported);
int4_a8_matmul: rows quantized to 8 bits (quantize_inputs) times 4-bit weights, int8_matmul: rows quantized to 16
bits (quantize_words) times 8-bit weights, both by integer dot products: AVX-512 VNNI's, or AVX2's (dot_kernels).
"""

from __future__ import annotations

import functools
import logging
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.dispatcher import Dispatcher
from numba.core.extending import intrinsic

log = logging.getLogger(__name__)


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
_V64B = ir.VectorType(_I8, 64)
_V16W, _V8I = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
# bfloat16 bits of q - 8 for a 4-bit q, twice: vpermw reads 5 bits of each index, and the fifth is the other nibble's
_NIBBLE_VALUES = [int(np.float32(q % 16 - 8).view(np.uint32)) >> 16 for q in range(32)]


def _i64(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _splat(builder: Any, value: Any, vector: Any) -> Any:
    """value in every lane of a vector of its type."""
    lanes = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(_I32, vector.count), [0] * vector.count))


def _load(builder: Any, base: Any, index: Any, vector: Any, align: int) -> Any:
    """The vector at base[index] (base: a pointer to its lanes' type)."""
    return builder.load(builder.bitcast(builder.gep(base, [index]), vector.as_pointer()), align=align)


_HALF_PROBE = """
define float @widen(i16 %bits) {
  %h = bitcast i16 %bits to half
  %f = fpext half %h to float
  ret float %f
}
define i16 @narrow(float %x) {
  %h = fptrunc float %x to half
  %bits = bitcast half %h to i16
  ret i16 %bits
}
"""


def _target_assembly(module: str) -> str:
    """LLVM IR compiled to assembly for the CPU numba compiles for (NUMBA_CPU_NAME, else this host)."""
    from llvmlite import binding

    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    cpu, features = getattr(numba.config, "CPU_NAME", None), getattr(numba.config, "CPU_FEATURES", None)
    if cpu in (None, "host"):  # numba takes this host's name, and its features unless NUMBA_CPU_FEATURES names them
        cpu = binding.get_host_cpu_name()
        features = binding.get_host_cpu_features().flatten() if features is None else features
    machine = binding.Target.from_default_triple().create_target_machine(cpu=cpu, features=features or "")
    return str(machine.emit_assembly(binding.parse_assembly(module)))


@functools.cache
def float16_native() -> bool:
    """Whether the CPU numba compiles for (NUMBA_CPU_NAME, else this host) converts float16 by instructions: F16C
    on x86 (in x86-64-v3), any AArch64. Elsewhere (x86's `generic`, x86-64-v2) LLVM calls conversion helpers that
    numba cannot link, and the process aborts: the float16 KV cache needs it (the runner keeps float32 without).
    Found by compiling the two conversions for that CPU and looking for the helpers' calls."""
    code = _target_assembly(_HALF_PROBE)
    return "__extendhfsf2" not in code and "__truncsfhf2" not in code


_EVEN, _ODD = (", ".join(f"i32 {i}" for i in range(first, 32, 2)) for first in (0, 1))  # lanes of pairs
_DOT_PROBE = f"""
define <16 x i16> @words(<16 x i16> %a, <16 x i16> %b) {{
  %sum = add <16 x i16> %a, %b
  ret <16 x i16> %sum
}}
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
define <8 x float> @fused(<8 x float> %a, <8 x float> %b, <8 x float> %c) {{
  %r = call <8 x float> @llvm.fma.v8f32(<8 x float> %a, <8 x float> %b, <8 x float> %c)
  ret <8 x float> %r
}}
define <16 x i32> @pairs(<32 x i16> %a, <32 x i16> %b, <16 x i32> %acc) {{
  %x = sext <32 x i16> %a to <32 x i32>
  %y = sext <32 x i16> %b to <32 x i32>
  %m = mul nsw <32 x i32> %x, %y
  %e = shufflevector <32 x i32> %m, <32 x i32> poison, <16 x i32> <{_EVEN}>
  %o = shufflevector <32 x i32> %m, <32 x i32> poison, <16 x i32> <{_ODD}>
  %s = add nsw <16 x i32> %e, %o
  %r = add <16 x i32> %s, %acc
  ret <16 x i32> %r
}}
"""


@functools.cache
def dot_kernels() -> Literal["avx512", "avx2"] | None:
    """Which instructions the 8-bit input and 8-bit head kernels (int4_a8_matmul, int8_matmul) take on the CPU
    numba compiles for: "avx512" where it has AVX-512 BW and VNNI (Cascade Lake, Ice Lake and later Xeons, Zen 4),
    "avx2" where it has AVX2 and FMA (an image's NUMBA_CPU_NAME=x86-64-v3), None elsewhere (torch's kernels then).
    This host's features are LLVM's; a named CPU's are found by compiling a probe for it: 16-bit products summed
    in pairs into a 512-bit accumulator (vpdpwssd on zmm only with both), 256-bit integer adds (ymm with AVX2) and
    a fused multiply-add (a call to fmaf without FMA)."""
    if _compiles_for_host():
        features = _host_features()
        if all(features.get(f) for f in ("avx512f", "avx512bw", "avx512vnni")):
            return "avx512"
        return "avx2" if features.get("avx2") and features.get("fma") else None
    code = _target_assembly(_DOT_PROBE)
    if re.search(r"vpdpwssd\s+%zmm", code):
        return "avx512"
    return "avx2" if re.search(r"vpaddw\s+%ymm", code) and re.search(r"vfmadd\w+\s+%ymm", code) else None


def _compiles_for_host() -> bool:
    """Whether numba compiles for this host's CPU (no NUMBA_CPU_NAME, or `host`)."""
    return getattr(numba.config, "CPU_NAME", None) in (None, "host")


KEY_BLOCK = 32  # positions of a block of keys, stored position-minor: one 64-byte line per dimension (float16)
HALF_MAX = 65504.0  # the largest finite float16: the cache clamps to it rather than store an infinity


def _half_bits_typer(typingctx: Any, x: Any) -> Any:
    """The bits of float32 x rounded to float16 (to nearest even; LLVM's fptrunc, vcvtps2ph on x86)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(types.float32), codegen


_half_bits: Callable[..., Any] = intrinsic(_half_bits_typer)


def _exp_typer(typingctx: Any, x: Any) -> Any:
    """e ** x for float32 x <= 0 (a softmax's scores less their maximum), as Cephes' expf computes it (within
    about an ulp): 2 ** n times a polynomial of the rest. Code LLVM vectorises where libm's expf is a call a
    value; below -87.3 (e ** x under float32's smallest normal) it gives 2 ** -126 times the polynomial."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        def const(value: float) -> ir.Constant:
            return ir.Constant(_F32, float(np.float32(value)))

        module = builder.module
        floor = cgutils.get_or_insert_function(module, ir.FunctionType(_F32, [_F32]), "llvm.floor.f32")
        fma = cgutils.get_or_insert_function(module, ir.FunctionType(_F32, [_F32] * 3), "llvm.fma.f32")
        low = const(-87.3)
        x = builder.select(builder.fcmp_ordered("<", args[0], low), low, args[0])
        n = builder.call(floor, [builder.fadd(builder.fmul(x, const(1.44269504088896341)), const(0.5))])
        r = builder.call(fma, [n, const(-0.693359375), x])
        r = builder.call(fma, [n, const(2.12194440e-4), r])
        poly = const(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            poly = builder.call(fma, [poly, r, const(c)])
        y = builder.fadd(builder.call(fma, [poly, builder.fmul(r, r), r]), const(1.0))
        exponent = builder.shl(builder.add(builder.fptosi(n, _I32), ir.Constant(_I32, 127)), ir.Constant(_I32, 23))
        return builder.fmul(y, builder.bitcast(exponent, _F32))

    return types.float32(types.float32), codegen


_exp: Callable[..., Any] = intrinsic(_exp_typer)


def _cache_lanes(builder: Any, base: Any, index: Any, lanes: int, half: bool) -> Any:
    """`lanes` cache values at base[index] as float32: float16 bits widened (vcvtph2ps on x86), or float32."""
    if not half:
        return _load(builder, base, index, ir.VectorType(_F32, lanes), 4)
    bits = _load(builder, base, index, ir.VectorType(_I16, lanes), 2)
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(_F32, lanes))


def _fma(builder: Any, lanes: int) -> Any:
    vector = ir.VectorType(_F32, lanes)
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{lanes}f32"
    )


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
    vector = ir.VectorType(_F32, lanes)
    per_pass = next(
        (n for n in (KEY_BLOCK, 16, 8) if group * chains * (n // lanes) <= registers * 3 // 4), min(KEY_BLOCK, lanes)
    )

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        keys_, q_, scores_ = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3))
        at_, column_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 4))
        fma = _fma(builder, lanes)
        base = builder.gep(keys_.data, [at_])
        width = cgutils.unpack_tuple(builder, scores_.shape, 2)[1]
        scale_ = _splat(builder, context.cast(builder, args[5], signature.args[5], types.float32), vector)
        zeros = ir.Constant(vector, [0.0] * lanes)
        for first in range(0, KEY_BLOCK, per_pass):
            part = range(first, first + per_pass, lanes)  # the pass's vectors, by their first key
            acc = [[[zeros] * chains for _ in part] for _ in range(group)]
            for d in range(dim):
                keys = [_cache_lanes(builder, base, _i64(KEY_BLOCK * d + j), lanes, half) for j in part]
                for g in range(group):
                    value = _splat(builder, builder.load(builder.gep(q_.data, [_i64(g * dim + d)])), vector)
                    for v, key in enumerate(keys):
                        acc[g][v][d % chains] = builder.call(fma, [value, key, acc[g][v][d % chains]])
            for g in range(group):
                row = builder.add(builder.mul(_i64(g), width), column_)
                for v, j in enumerate(part):
                    total = acc[g][v][0]
                    for chain in acc[g][v][1:]:
                        total = builder.fadd(total, chain)
                    at = builder.gep(scores_.data, [builder.add(row, _i64(j))])
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
    vector = ir.VectorType(_F32, lanes)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        values_, weights_, out_ = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3, 5))
        at_, n_, column_, r_, query_ = (
            context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 4, 6, 7)
        )
        fma = _fma(builder, lanes)
        width = cgutils.unpack_tuple(builder, weights_.shape, 2)[1]
        out_width = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
        zeros = ir.Constant(vector, [0.0] * lanes)
        for first in range(0, vectors, per_slice):
            part = range(first, min(vectors, first + per_slice))
            acc = [[cgutils.alloca_once_value(builder, zeros) for _ in part] for _ in range(group)]
            with cgutils.for_range(builder, n_) as loop:
                p = loop.index
                row = builder.add(at_, builder.mul(p, _i64(dim)))
                loaded = [
                    _cache_lanes(builder, values_.data, builder.add(row, _i64(lanes * c)), lanes, half) for c in part
                ]
                for g in range(group):
                    at = builder.add(builder.mul(_i64(g), width), builder.add(column_, p))
                    w = _splat(builder, builder.load(builder.gep(weights_.data, [at])), vector)
                    for slot, value in zip(acc[g], loaded, strict=True):
                        builder.store(builder.call(fma, [w, value, builder.load(slot)]), slot)
            for g in range(group):
                for slot, c in zip(acc[g], part, strict=True):
                    index = builder.add(builder.mul(r_, out_width), builder.add(query_, _i64(g * dim + lanes * c)))
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
    (_exp). A 16-row decode step reads each row's cache once, so float16's half of the bytes counts too.

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
                    e = _exp(scores[g, skip + p] - top)
                    scores[g, skip + p] = e
                    total += e
                for p in range(n):
                    scores[g, skip + p] /= total
            _value_rows(values[slot, h], first * dim, n, scores, skip, out, r, h * group * dim, dim, group, half)

    _ATTENTION[(dim, group, half)] = kernel
    return kernel


_ATTENTION: dict[tuple[int, int, bool], Any] = {}  # attention's kernels made in this process, by their arguments


@njit(inline="always")
def key_index(position: int, dim: int) -> int:
    """Where dimension 0 of the key at `position` is in a (slot, kv head)'s keys, flattened (see attention):
    dimension d is KEY_BLOCK d further."""
    block = position // KEY_BLOCK
    return block * dim * KEY_BLOCK + position - block * KEY_BLOCK


@njit(fastmath=True, nogil=True, cache=True)
def quantize_rows(x: np.ndarray, top: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Each row of x (N, K) float32 to unsigned 8 bits with its own scale: (top + 1 + round(x / s) as uint8,
    s (N, 1)), s = max |x| / top over the row, so the values lie in 1..2 top + 1.

    top 127 uses all 8 bits; 63 keeps 7, for CPUs whose int8 instructions sum pairs of products in 16 bits
    (see INT8_INPUT_TOP in projections.py). One call instead of the seven torch ops it takes (abs, amax, scale, clamp,
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


GELU_K = np.float32(np.sqrt(2 / np.pi))


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def gated(gate_up: np.ndarray, gelu: bool) -> np.ndarray:
    """act(gate) * up for rows of gate_up (N, 2I), gate its first I columns: act SiLU, x sigmoid(x), or with gelu
    Gemma's GELU (tanh's approximation), 0.5 x (1 + tanh(y)) = x sigmoid(2 y), y = sqrt(2 / pi) (x + 0.044715
    x ** 3). sigmoid(z) = 1 / (1 + e) for z >= 0 and e / (1 + e) below, e = e ** -|z| by _exp (no overflow, no
    cancellation), which LLVM vectorises: one call where numpy took five ops and its float32 exp a value at a
    time (6.5 against 14.5 us at one row, 17 against 104 us at 16 here)."""
    n, width = gate_up.shape
    half = width // 2
    out = np.empty((n, half), np.float32)
    for i in prange(n):
        for j in range(half):
            x = gate_up[i, j]
            z = np.float32(2.0) * GELU_K * (x + np.float32(0.044715) * x * x * x) if gelu else x
            e = _exp(-abs(z))
            out[i, j] = x * (np.float32(1.0) if z >= 0 else e) / (np.float32(1.0) + e) * gate_up[i, half + j]
    return out


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


@njit(fastmath=True, nogil=True, cache=True)
def add_rms_norm(x: np.ndarray, y: np.ndarray, weight: np.ndarray, eps: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """x + y (N, C) float32, the residual stream after a block, and rms_norm of it with weight: the next block's
    input. A step makes 60 such pairs; one call each in place of a numpy add and a call made one-row steps ~2 %
    faster here."""
    n, c = x.shape
    total = np.empty((n, c), np.float32)
    for i in range(n):
        for j in range(c):
            total[i, j] = x[i, j] + y[i, j]
    return total, rms_norm(total, weight, eps)


KernelKey = str | tuple[int, int, bool]  # a kernel of this module by its name, or attention's by its arguments


def compiled_signatures() -> list[tuple[KernelKey, list[Any]]]:
    """The kernels this process has compiled (or loaded from numba's cache), each with its argument types: what
    compile_signatures compiles again in a process whose numba compiles for another CPU."""
    named = [(name, kernel) for name, kernel in globals().items() if isinstance(kernel, Dispatcher)]
    kernels: list[tuple[KernelKey, Any]] = [*named, *_ATTENTION.items()]
    return [(key, list(kernel.signatures)) for key, kernel in kernels if kernel.signatures]


def compile_signatures(entries: list[tuple[KernelKey, list[Any]]]) -> None:
    """Compile the kernels compiled_signatures listed (in another process) for the CPU this process's numba
    compiles for, into its cache, without running them: that CPU may have instructions this one lacks (an
    image's build compiling for hosts with AVX-512, see shared.backends.targets)."""
    for key, signatures in entries:
        kernel: Any = attention(*key) if isinstance(key, tuple) else globals()[key]
        for signature in signatures:
            kernel.compile(signature)


def compile_pickled() -> None:
    """compile_signatures over the pickled list on standard input (`fnserve prepare --kernels-for`'s step)."""
    compile_signatures(pickle.load(sys.stdin.buffer))


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
AVX2_ROWS = 4  # rows an AVX2 tile runs at once (see _row_chunks)
INT8_TILE_ROWS = 16  # of an int8 task: its conversions cost more, so 16 rows share each (6 against 7.5 ms, the head)


@functools.cache
def int4_dot_supported() -> bool:
    """Whether int4_matmul (AVX-512 BF16's bfloat16 dot products) runs: numba compiles for this host, whose
    dot_kernels() are "avx512", and which has AVX-512 BF16 too (Zen 4, Sapphire Rapids; not Cascade Lake or Ice
    Lake). Kernels compiled for a named CPU leave int4 to torch's kernel."""
    return _compiles_for_host() and dot_kernels() == "avx512" and bool(_host_features().get("avx512bf16"))


def _host_features() -> dict[str, bool]:
    """This host's CPU features as numba compiles for them: LLVM's list, with NUMBA_CPU_FEATURES' +name and
    -name entries over it (numba hands LLVM that string instead, over the host CPU's own defaults)."""
    from llvmlite import binding

    features = dict(binding.get_host_cpu_features())
    for entry in (getattr(numba.config, "CPU_FEATURES", None) or "").split(","):
        if entry[:1] in ("+", "-") and entry[1:]:
            features[entry[1:]] = entry[0] == "+"
    return features


def _tile_arguments(context: Any, builder: Any, signature: Any, args: Any) -> tuple[list[Any], Any, Any]:
    """A tile call's five arrays (numba's array structs) and its first row and column block as intp."""
    arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:5], args[:5], strict=True)]
    first, block = (context.cast(builder, a, t, types.intp) for a, t in zip(args[5:], signature.args[5:], strict=True))
    return arrays, first, block


def _tile_groups(
    builder: Any,
    rows: int,
    groups: Any,
    steps: int,
    zero: Any,
    step_body: Callable[..., None],
    group_end: Callable[..., None],
) -> list[Any]:
    """The loops of every tile: for each group of 32 inputs, a dot accumulator a row set to `zero`,
    step_body(step, dots) for each of its `steps` steps (step counted from the first group), then
    group_end(g, dots, totals) adds the group into the rows' float32 totals (allocas of 16 lanes), returned."""
    totals = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16)) for _ in range(rows)]
    dots = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]
    with cgutils.for_range(builder, groups) as group_loop:
        g = group_loop.index
        for acc in dots:
            builder.store(zero, acc)
        with cgutils.for_range(builder, _i64(steps)) as step_loop:
            step_body(builder.add(builder.mul(g, _i64(steps)), step_loop.index), dots)
        group_end(g, dots, totals)
    return totals


def _store_rows(builder: Any, out: Any, first: Any, n: Any, column: Any, totals: list[Any]) -> None:
    """A tile's sums (allocas of 16 lanes, one a row) into out[first + r, column : column + 16] (out: N columns)."""
    for r, total in enumerate(totals):
        at = builder.gep(out, [builder.add(builder.mul(builder.add(first, _i64(r)), n), column)])
        builder.store(builder.load(total), builder.bitcast(at, _V16F.as_pointer()), align=4)


def _int4_tile(rows: int) -> Callable[..., None]:
    """tile(pairs, sums, quads, sz, out, r0, block): out[r0 : r0 + rows, 16 block : 16 block + 16] (see
    int4_matmul), as LLVM vector code: numba vectorised no form of it (scalar loads and byte inserts)."""

    def typer(typingctx: Any, pairs: Any, sums: Any, quads: Any, sz: Any, out: Any, r0: Any, block: Any) -> Any:
        sig = types.void(pairs, sums, quads, sz, out, r0, block)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            (pairs_, sums_, quads_, sz_, out_), first, block = _tile_arguments(context, builder, signature, args)
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

            def pair(r: int, index: Any) -> Any:
                """Inputs 2 index and 2 index + 1 of row r, as a bfloat16 pair in every lane."""
                x = builder.load(builder.gep(x_rows, [builder.add(builder.mul(_i64(r), width), index)]))
                return builder.bitcast(_splat(builder, x, _V16I), _V32BF)

            def step_body(step: Any, dots: list[Any]) -> None:  # 4 inputs a step, 32 a group
                # word 2j + h: column j's inputs 4 step + h (low nibble) and 4 step + h + 2 (high nibble)
                words = builder.zext(_load(builder, block_quads, builder.mul(step, _i64(32)), _V32B, 1), _V32H)
                low = builder.bitcast(builder.call(permute, [ir.Constant(_V32H, _NIBBLE_VALUES), words]), _V32BF)
                shifted = builder.lshr(words, ir.Constant(_V32H, [4] * 32))
                high = builder.bitcast(builder.call(permute, [ir.Constant(_V32H, _NIBBLE_VALUES), shifted]), _V32BF)
                index = builder.mul(step, _i64(2))
                for r, acc in enumerate(dots):
                    partial = builder.call(dot, [builder.load(acc), pair(r, index), low])
                    builder.store(builder.call(dot, [partial, pair(r, builder.add(index, _i64(1))), high]), acc)

            def group_end(g: Any, dots: list[Any], totals: list[Any]) -> None:
                at = builder.mul(builder.add(builder.mul(block, groups), g), _i64(32))  # sz[block, g]: 16 pairs
                bits = builder.zext(_load(builder, scales, at, _V32H, 2), _V32I)
                both = builder.bitcast(builder.shl(bits, ir.Constant(_V32I, [16] * 32)), _V32F)
                scale = builder.shuffle_vector(both, both, ir.Constant(_V16I, list(range(0, 32, 2))))
                zero = builder.shuffle_vector(both, both, ir.Constant(_V16I, list(range(1, 32, 2))))
                for r, (acc, total) in enumerate(zip(dots, totals, strict=True)):
                    group_sum = builder.load(builder.gep(sum_rows, [builder.add(builder.mul(_i64(r), groups), g)]))
                    scaled = builder.call(fma, [scale, builder.load(acc), builder.load(total)])
                    builder.store(builder.call(fma, [zero, _splat(builder, group_sum, _V16F), scaled]), total)

            zeros = ir.Constant(_V16F, [0.0] * 16)
            totals = _tile_groups(builder, rows, groups, 8, zeros, step_body, group_end)
            _store_rows(builder, out_.data, first, n, column, totals)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _madd(builder: Any, name: str) -> Any:
    """AVX2's pmaddubsw ("ub.sw": unsigned bytes times signed bytes, adjacent products summed into 16 int16s)
    or pmaddwd ("wd": int16s times int16s, adjacent products summed into 8 int32s)."""
    arguments, result = {"ub.sw": (_V32B, _V16W), "wd": (_V16W, _V8I)}[name]
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(result, [arguments] * 2), f"llvm.x86.avx2.pmadd.{name}"
    )


def _half(builder: Any, vector: Any, which: int) -> Any:
    """The low (0) or high (1) half of a vector's lanes."""
    lanes = vector.type.count // 2
    mask = ir.Constant(ir.VectorType(_I32, lanes), [which * lanes + i for i in range(lanes)])
    return builder.shuffle_vector(vector, vector, mask)


def _join(builder: Any, low: Any, high: Any) -> Any:
    """Two vectors' lanes, low's first."""
    lanes = low.type.count * 2
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, lanes), list(range(lanes))))


def _row_chunks(rows: int, isa: str | None) -> list[tuple[int, int]]:
    """A tile's rows as (first, count) runs: all at once with AVX-512's 32 registers, AVX2_ROWS at a time with
    AVX2's 16 (a run's sums of 16 columns take two registers a row there)."""
    step = rows if isa == "avx512" else AVX2_ROWS
    return [(r, min(step, rows - r)) for r in range(0, rows, step)]


def _int8_tile(rows: int) -> Callable[..., None]:
    """tile(inputs, steps, bytes, scales, out, r0, block): out[r0 : r0 + rows, 16 block : 16 block + 16] (see
    int8_matmul; inputs: the rows' 16-bit values, two to an int32, and steps their groups'), as LLVM vector code,
    the signature of _int4_tile's. AVX-512 VNNI's vpdpwssd sums two 16-bit products into an int32; AVX2
    (dot_kernels()) takes pmaddwd and an add for it: the same integers, and the same float arithmetic after."""

    def typer(typingctx: Any, pairs: Any, steps: Any, weights: Any, scales: Any, out: Any, r0: Any, block: Any) -> Any:
        sig = types.void(pairs, steps, weights, scales, out, r0, block)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            (pairs_, steps_, weights_, scales_, out_), first, block = _tile_arguments(context, builder, signature, args)
            width = cgutils.unpack_tuple(builder, pairs_.shape, 2)[1]  # K / 2: input pairs a row
            n = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
            groups = builder.udiv(width, _i64(16))
            isa = dot_kernels()
            dot = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V16I, [_V16I] * 3), "llvm.x86.avx512.vpdpwssd.512"
            )
            fma = _fma(builder, 16)
            column = builder.mul(block, _i64(16))
            block_bytes = builder.gep(weights_.data, [builder.mul(block, builder.mul(width, _i64(32)))])

            def run(r0: Any, count: int) -> None:
                x_rows = builder.gep(pairs_.data, [builder.mul(r0, width)])
                step_rows = builder.gep(steps_.data, [builder.mul(r0, groups)])

                def pair(r: int, step: Any) -> Any:
                    """Row r's 16-bit inputs 2 step and 2 step + 1 in every lane."""
                    x = builder.load(builder.gep(x_rows, [builder.add(builder.mul(_i64(r), width), step)]))
                    return _splat(builder, x, _V16I)

                def step_body(step: Any, dots: list[Any]) -> None:  # 2 inputs a step, 32 a group
                    # byte 2j + t: column j's input 2 step + t, an integer of -127..127, widened to 16 bits
                    values = _load(builder, block_bytes, builder.mul(step, _i64(32)), _V32B, 1)
                    words = builder.sext(values, _V32H)
                    for r, acc in enumerate(dots):
                        if isa == "avx512":
                            builder.store(
                                builder.call(dot, [builder.load(acc), builder.bitcast(words, _V16I), pair(r, step)]),
                                acc,
                            )
                            continue
                        x = builder.bitcast(_half(builder, pair(r, step), 0), _V16W)
                        halves = (builder.call(_madd(builder, "wd"), [_half(builder, words, h), x]) for h in (0, 1))
                        builder.store(builder.add(builder.load(acc), _join(builder, *halves)), acc)

                def group_end(g: Any, dots: list[Any], totals: list[Any]) -> None:
                    at = builder.mul(builder.add(builder.mul(block, groups), g), _i64(16))
                    scale = _load(builder, scales_.data, at, _V16F, 4)
                    for r, (acc, total) in enumerate(zip(dots, totals, strict=True)):
                        step = builder.load(builder.gep(step_rows, [builder.add(builder.mul(_i64(r), groups), g)]))
                        unit = builder.fmul(scale, _splat(builder, step, _V16F))
                        dot_sum = builder.sitofp(builder.load(acc), _V16F)
                        builder.store(builder.call(fma, [unit, dot_sum, builder.load(total)]), total)

                totals = _tile_groups(builder, count, groups, 16, ir.Constant(_V16I, [0] * 16), step_body, group_end)
                _store_rows(builder, out_.data, r0, n, column, totals)

            for offset, count in _row_chunks(rows, isa):
                run(builder.add(first, _i64(offset)), count)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _int4_a8_tile(rows: int) -> Callable[..., None]:
    """tile(inputs, sums, nibbles, scales, out, r0, block): out[r0 : r0 + rows, 16 block : 16 block + 16] (see
    int4_a8_matmul; inputs: the rows' 8-bit values, four to an int32), as LLVM vector code, the signature of
    _int4_tile's. AVX-512 VNNI's vpdpbusd sums four byte products into an int32; AVX2 (dot_kernels()) takes two
    instructions for it: pmaddubsw sums two into an int16 (at most 2 x 15 x 127, a group's eight of them at
    most 30480: exact), and pmaddwd the group's int16s into int32s at its end. The same integers either way,
    and the same float arithmetic after them: the same result."""

    def typer(typingctx: Any, inputs: Any, sums: Any, nibbles: Any, scales: Any, out: Any, r0: Any, block: Any) -> Any:
        sig = types.void(inputs, sums, nibbles, scales, out, r0, block)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrays, first, block = _tile_arguments(context, builder, signature, args)
            inputs_, sums_, nibbles_, scales_, out_ = arrays
            width = cgutils.unpack_tuple(builder, inputs_.shape, 2)[1]  # K / 4: 8-bit inputs in fours a row
            n = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
            groups = builder.udiv(width, _i64(8))
            isa = dot_kernels()
            dot = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V16I, [_V16I] * 3), "llvm.x86.avx512.vpdpbusd.512"
            )
            fma = _fma(builder, 16)
            column = builder.mul(block, _i64(16))
            block_nibbles = builder.gep(nibbles_.data, [builder.mul(block, builder.mul(width, _i64(32)))])
            low_nibbles = ir.Constant(_V64B, [15] * 64)
            ones = ir.Constant(_V16W, [1] * 16)

            def products(weights: Any, x: Any) -> Any:
                """AVX2: the 16 columns' sums of two byte products, as 32 int16s (x: four inputs in every lane)."""
                inputs = builder.bitcast(_half(builder, x, 0), _V32B)
                halves = (builder.bitcast(_half(builder, weights, h), _V32B) for h in (0, 1))
                return _join(builder, *(builder.call(_madd(builder, "ub.sw"), [w, inputs]) for w in halves))

            def run(r0: Any, count: int) -> None:
                x_rows = builder.gep(inputs_.data, [builder.mul(r0, width)])
                sum_rows = builder.gep(sums_.data, [builder.mul(r0, builder.mul(groups, _i64(2)))])

                def four(r: int, index: Any) -> Any:
                    """Row r's 8-bit inputs 4 index .. 4 index + 3 in every lane."""
                    x = builder.load(builder.gep(x_rows, [builder.add(builder.mul(_i64(r), width), index)]))
                    return _splat(builder, x, _V16I)

                def step_body(step: Any, dots: list[Any]) -> None:  # 8 inputs a step, 32 a group
                    # byte 4j + t: column j's input 8 step + t (low nibble) and 8 step + 4 + t (high nibble)
                    raw = _load(builder, block_nibbles, builder.mul(step, _i64(64)), _V64B, 1)
                    low = builder.bitcast(builder.and_(raw, low_nibbles), _V16I)
                    high = builder.lshr(builder.bitcast(raw, _V16I), ir.Constant(_V16I, [4] * 16))
                    high = builder.bitcast(builder.and_(builder.bitcast(high, _V64B), low_nibbles), _V16I)
                    index = builder.mul(step, _i64(2))
                    for r, acc in enumerate(dots):
                        x_low, x_high = four(r, index), four(r, builder.add(index, _i64(1)))
                        if isa == "avx512":
                            partial = builder.call(dot, [builder.load(acc), low, x_low])
                            builder.store(builder.call(dot, [partial, high, x_high]), acc)
                        else:
                            partial = builder.add(builder.load(acc), products(low, x_low))
                            builder.store(builder.add(partial, products(high, x_high)), acc)

                def group_end(g: Any, dots: list[Any], totals: list[Any]) -> None:
                    at = builder.mul(builder.add(builder.mul(block, groups), g), _i64(32))  # scales[block, g]: 2 x 16
                    scale, low_bound = (_cache_lanes(builder, scales_.data, builder.add(at, _i64(i)), 16, True)
                                        for i in (0, 16))  # fmt: skip
                    for r, (acc, total) in enumerate(zip(dots, totals, strict=True)):
                        at = builder.mul(builder.add(builder.mul(_i64(r), groups), g), _i64(2))
                        unit, group_sum = (builder.load(builder.gep(sum_rows, [builder.add(at, _i64(i))]))
                                           for i in (0, 1))  # fmt: skip
                        dots_ = builder.load(acc)
                        if isa != "avx512":  # the int16 pairs' sums
                            halves = (
                                builder.call(_madd(builder, "wd"), [_half(builder, dots_, h), ones]) for h in (0, 1)
                            )
                            dots_ = _join(builder, *halves)
                        scaled = builder.fmul(scale, _splat(builder, unit, _V16F))
                        part = builder.call(fma, [scaled, builder.sitofp(dots_, _V16F), builder.load(total)])
                        builder.store(builder.call(fma, [low_bound, _splat(builder, group_sum, _V16F), part]), total)

                zero = ir.Constant(_V16I, [0] * 16) if isa == "avx512" else ir.Constant(_V32H, [0] * 32)
                totals = _tile_groups(builder, count, groups, 4, zero, step_body, group_end)
                _store_rows(builder, out_.data, r0, n, column, totals)

            for offset, count in _row_chunks(rows, isa):
                run(builder.add(first, _i64(offset)), count)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _tiled(tiles: tuple[Callable[..., None], ...], top: int) -> Callable[..., None]:
    """run(pairs, sums, weights, scales, out): every tile of out (M, N), tasks of `top` rows by 16 columns in
    parallel, by tile kernels (_int4_tile's or _int8_tile's) of 1, 2, 4, 8 and `top` rows (the last rows in the
    smaller ones)."""
    tile1, tile2, tile4, tile8, tile_top = tiles

    @njit(parallel=True, nogil=True, cache=True)
    def run(pairs: np.ndarray, sums: np.ndarray, weights: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
        m, n = out.shape
        blocks = (m + top - 1) // top
        for task in prange(n // 16 * blocks):
            block = task // blocks
            r0 = (task - block * blocks) * top
            rows = min(top, m - r0)
            if rows == top:
                tile_top(pairs, sums, weights, scales, out, r0, block)
            else:
                if rows & 8:
                    tile8(pairs, sums, weights, scales, out, r0, block)
                if rows & 4:
                    tile4(pairs, sums, weights, scales, out, r0 + (rows & 8), block)
                if rows & 2:
                    tile2(pairs, sums, weights, scales, out, r0 + (rows & 12), block)
                if rows & 1:
                    tile1(pairs, sums, weights, scales, out, r0 + (rows & 14), block)

    return run


_int4_tiles = _tiled(tuple(_int4_tile(rows) for rows in (1, 2, 4, 8, 8)), INT4_TILE_ROWS)
_int8_tiles = _tiled(tuple(_int8_tile(rows) for rows in (1, 2, 4, 8, INT8_TILE_ROWS)), INT8_TILE_ROWS)
_int4_a8_tiles = _tiled(tuple(_int4_a8_tile(rows) for rows in (1, 2, 4, 8, 8)), INT4_TILE_ROWS)


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
    rows' 8-bit inputs by vpdpbusd (4 products a lane, exact in int32; AVX2: see _int4_a8_tile), then adds
    scale * step * dot + low * (the group's sum of the 8-bit inputs times the step). An instruction multiplies 64
    pairs where vdpbf16ps multiplies 32, and the decoding costs a third as much. A row's result does not depend
    on its batch.
    """
    q, steps = quantize_inputs(x)
    out = np.empty((x.shape[0], n), np.float32)
    _int4_a8_tiles(q.view(np.int32), steps, nibbles, scales, out)
    return out
