"""LLVM IR pieces the kernels are written with: vector types, loads, broadcasts, fused multiply-adds, the
integers' pairwise sums, and an exponential LLVM vectorises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic


class BFloat16(ir.Type):
    """LLVM's bfloat, which llvmlite's IR builder does not name; AVX-512 BF16's dot product takes vectors of it."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BFloat16)

    def __hash__(self) -> int:
        return hash("bfloat")


# vectors of V<lanes><kind>: F float32, I int32, H int16, W int16, B int8, BF bfloat16
I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
V16F, V16I, V32H, V32BF = (ir.VectorType(t, n) for t, n in ((F32, 16), (I32, 16), (I16, 32), (BFloat16(), 32)))
V32I, V32F, V32B = ir.VectorType(I32, 32), ir.VectorType(F32, 32), ir.VectorType(I8, 32)
V64B = ir.VectorType(I8, 64)
V16W, V8I = ir.VectorType(I16, 16), ir.VectorType(I32, 8)


def i64(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def splat(builder: Any, value: Any, vector: Any) -> Any:
    """value in every lane of a vector of its type."""
    lanes = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(I32, vector.count), [0] * vector.count))


def load_vector(builder: Any, base: Any, index: Any, vector: Any, align: int) -> Any:
    """The vector at base[index] (base: a pointer to its lanes' type)."""
    return builder.load(builder.bitcast(builder.gep(base, [index]), vector.as_pointer()), align=align)


def _fast_exp_typer(typingctx: Any, x: Any) -> Any:
    """e ** x for float32 x <= 0 (a softmax's scores less their maximum), as Cephes' expf computes it (within
    about an ulp): 2 ** n times a polynomial of the rest. Code LLVM vectorises where libm's expf is a call a
    value; below -87.3 (e ** x under float32's smallest normal) it gives 2 ** -126 times the polynomial."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        def const(value: float) -> ir.Constant:
            return ir.Constant(F32, float(np.float32(value)))

        module = builder.module
        floor = cgutils.get_or_insert_function(module, ir.FunctionType(F32, [F32]), "llvm.floor.f32")
        fma = cgutils.get_or_insert_function(module, ir.FunctionType(F32, [F32] * 3), "llvm.fma.f32")
        low = const(-87.3)
        x = builder.select(builder.fcmp_ordered("<", args[0], low), low, args[0])
        n = builder.call(floor, [builder.fadd(builder.fmul(x, const(1.44269504088896341)), const(0.5))])
        r = builder.call(fma, [n, const(-0.693359375), x])
        r = builder.call(fma, [n, const(2.12194440e-4), r])
        poly = const(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            poly = builder.call(fma, [poly, r, const(c)])
        y = builder.fadd(builder.call(fma, [poly, builder.fmul(r, r), r]), const(1.0))
        exponent = builder.shl(builder.add(builder.fptosi(n, I32), ir.Constant(I32, 127)), ir.Constant(I32, 23))
        return builder.fmul(y, builder.bitcast(exponent, F32))

    return types.float32(types.float32), codegen


fast_exp: Callable[..., Any] = intrinsic(_fast_exp_typer)


def float_lanes(builder: Any, base: Any, index: Any, lanes: int, half: bool) -> Any:
    """`lanes` cache values at base[index] as float32: float16 bits widened (vcvtph2ps on x86), or float32."""
    if not half:
        return load_vector(builder, base, index, ir.VectorType(F32, lanes), 4)
    bits = load_vector(builder, base, index, ir.VectorType(I16, lanes), 2)
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(F32, lanes))


def vector_fma(builder: Any, lanes: int) -> Any:
    vector = ir.VectorType(F32, lanes)
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{lanes}f32"
    )


def madd(builder: Any, name: str) -> Any:
    """AVX2's pmaddubsw ("ub.sw": unsigned bytes times signed bytes, adjacent products summed into 16 int16s)
    or pmaddwd ("wd": int16s times int16s, adjacent products summed into 8 int32s)."""
    arguments, result = {"ub.sw": (V32B, V16W), "wd": (V16W, V8I)}[name]
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(result, [arguments] * 2), f"llvm.x86.avx2.pmadd.{name}"
    )


def vector_half(builder: Any, vector: Any, which: int) -> Any:
    """The low (0) or high (1) half of a vector's lanes."""
    lanes = vector.type.count // 2
    mask = ir.Constant(ir.VectorType(I32, lanes), [which * lanes + i for i in range(lanes)])
    return builder.shuffle_vector(vector, vector, mask)


def join_halves(builder: Any, low: Any, high: Any) -> Any:
    """Two vectors' lanes, low's first."""
    lanes = low.type.count * 2
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(I32, lanes), list(range(lanes))))
