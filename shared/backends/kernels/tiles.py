"""The matmuls' tiles in LLVM vector code: a task of up to 16 rows by 16 columns of the output, for each kind of
weights (int4_tile, int8_tile, int4_a8_tile), and tiled, which runs every tile of an output in parallel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from shared.backends.kernels.isa import dot_kernels
from shared.backends.kernels.llvm import (
    I16,
    V16F,
    V16I,
    V16W,
    V32B,
    V32BF,
    V32F,
    V32H,
    V32I,
    V64B,
    float_lanes,
    i64,
    join_halves,
    load_vector,
    madd,
    splat,
    vector_fma,
    vector_half,
)

# bfloat16 bits of q - 8 for a 4-bit q, twice: vpermw reads 5 bits of each index, and the fifth is the other nibble's
_NIBBLE_VALUES = [int(np.float32(q % 16 - 8).view(np.uint32)) >> 16 for q in range(32)]


INT4_TILE_ROWS = 8  # rows of one int4 task: each decoded weight serves 8 rows (8 x 16 columns fit the registers)
AVX2_ROWS = 4  # rows an AVX2 tile runs at once (see _row_chunks)
INT8_TILE_ROWS = 16  # of an int8 task: its conversions cost more, so 16 rows share each (6 against 7.5 ms, the head)


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
    totals = [cgutils.alloca_once_value(builder, ir.Constant(V16F, [0.0] * 16)) for _ in range(rows)]
    dots = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]
    with cgutils.for_range(builder, groups) as group_loop:
        g = group_loop.index
        for acc in dots:
            builder.store(zero, acc)
        with cgutils.for_range(builder, i64(steps)) as step_loop:
            step_body(builder.add(builder.mul(g, i64(steps)), step_loop.index), dots)
        group_end(g, dots, totals)
    return totals


def _store_rows(builder: Any, out: Any, first: Any, n: Any, column: Any, totals: list[Any]) -> None:
    """A tile's sums (allocas of 16 lanes, one a row) into out[first + r, column : column + 16] (out: N columns)."""
    for r, total in enumerate(totals):
        at = builder.gep(out, [builder.add(builder.mul(builder.add(first, i64(r)), n), column)])
        builder.store(builder.load(total), builder.bitcast(at, V16F.as_pointer()), align=4)


def int4_tile(rows: int) -> Callable[..., None]:
    """tile(pairs, sums, quads, sz, out, r0, block): out[r0 : r0 + rows, 16 block : 16 block + 16] (see
    int4_matmul), as LLVM vector code: numba vectorised no form of it (scalar loads and byte inserts)."""

    def typer(typingctx: Any, pairs: Any, sums: Any, quads: Any, sz: Any, out: Any, r0: Any, block: Any) -> Any:
        sig = types.void(pairs, sums, quads, sz, out, r0, block)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            (pairs_, sums_, quads_, sz_, out_), first, block = _tile_arguments(context, builder, signature, args)
            width = cgutils.unpack_tuple(builder, pairs_.shape, 2)[1]  # K / 2: bfloat16 pairs a row
            n = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
            groups = builder.udiv(width, i64(16))
            module = builder.module
            dot = cgutils.get_or_insert_function(
                module, ir.FunctionType(V16F, [V16F, V32BF, V32BF]), "llvm.x86.avx512bf16.dpbf16ps.512"
            )
            permute = cgutils.get_or_insert_function(
                module, ir.FunctionType(V32H, [V32H, V32H]), "llvm.x86.avx512.permvar.hi.512"
            )
            fma = cgutils.get_or_insert_function(module, ir.FunctionType(V16F, [V16F] * 3), "llvm.fma.v16f32")
            column = builder.mul(block, i64(16))
            x_rows = builder.gep(pairs_.data, [builder.mul(first, width)])
            sum_rows = builder.gep(sums_.data, [builder.mul(first, groups)])
            block_quads = builder.gep(quads_.data, [builder.mul(block, builder.mul(width, i64(16)))])
            scales = builder.bitcast(sz_.data, ir.PointerType(I16))

            def pair(r: int, index: Any) -> Any:
                """Inputs 2 index and 2 index + 1 of row r, as a bfloat16 pair in every lane."""
                x = builder.load(builder.gep(x_rows, [builder.add(builder.mul(i64(r), width), index)]))
                return builder.bitcast(splat(builder, x, V16I), V32BF)

            def step_body(step: Any, dots: list[Any]) -> None:  # 4 inputs a step, 32 a group
                # word 2j + h: column j's inputs 4 step + h (low nibble) and 4 step + h + 2 (high nibble)
                words = builder.zext(load_vector(builder, block_quads, builder.mul(step, i64(32)), V32B, 1), V32H)
                low = builder.bitcast(builder.call(permute, [ir.Constant(V32H, _NIBBLE_VALUES), words]), V32BF)
                shifted = builder.lshr(words, ir.Constant(V32H, [4] * 32))
                high = builder.bitcast(builder.call(permute, [ir.Constant(V32H, _NIBBLE_VALUES), shifted]), V32BF)
                index = builder.mul(step, i64(2))
                for r, acc in enumerate(dots):
                    partial = builder.call(dot, [builder.load(acc), pair(r, index), low])
                    builder.store(builder.call(dot, [partial, pair(r, builder.add(index, i64(1))), high]), acc)

            def group_end(g: Any, dots: list[Any], totals: list[Any]) -> None:
                at = builder.mul(builder.add(builder.mul(block, groups), g), i64(32))  # sz[block, g]: 16 pairs
                bits = builder.zext(load_vector(builder, scales, at, V32H, 2), V32I)
                both = builder.bitcast(builder.shl(bits, ir.Constant(V32I, [16] * 32)), V32F)
                scale = builder.shuffle_vector(both, both, ir.Constant(V16I, list(range(0, 32, 2))))
                zero = builder.shuffle_vector(both, both, ir.Constant(V16I, list(range(1, 32, 2))))
                for r, (acc, total) in enumerate(zip(dots, totals, strict=True)):
                    group_sum = builder.load(builder.gep(sum_rows, [builder.add(builder.mul(i64(r), groups), g)]))
                    scaled = builder.call(fma, [scale, builder.load(acc), builder.load(total)])
                    builder.store(builder.call(fma, [zero, splat(builder, group_sum, V16F), scaled]), total)

            zeros = ir.Constant(V16F, [0.0] * 16)
            totals = _tile_groups(builder, rows, groups, 8, zeros, step_body, group_end)
            _store_rows(builder, out_.data, first, n, column, totals)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _row_chunks(rows: int, isa: str | None) -> list[tuple[int, int]]:
    """A tile's rows as (first, count) runs: all at once with AVX-512's 32 registers, AVX2_ROWS at a time with
    AVX2's 16 (a run's sums of 16 columns take two registers a row there)."""
    step = rows if isa == "avx512" else AVX2_ROWS
    return [(r, min(step, rows - r)) for r in range(0, rows, step)]


def int8_tile(rows: int) -> Callable[..., None]:
    """tile(inputs, steps, bytes, scales, out, r0, block): out[r0 : r0 + rows, 16 block : 16 block + 16] (see
    int8_matmul; inputs: the rows' 16-bit values, two to an int32, and steps their groups'), as LLVM vector code,
    the signature of int4_tile's. AVX-512 VNNI's vpdpwssd sums two 16-bit products into an int32; AVX2
    (dot_kernels()) takes pmaddwd and an add for it: the same integers, and the same float arithmetic after."""

    def typer(typingctx: Any, pairs: Any, steps: Any, weights: Any, scales: Any, out: Any, r0: Any, block: Any) -> Any:
        sig = types.void(pairs, steps, weights, scales, out, r0, block)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            (pairs_, steps_, weights_, scales_, out_), first, block = _tile_arguments(context, builder, signature, args)
            width = cgutils.unpack_tuple(builder, pairs_.shape, 2)[1]  # K / 2: input pairs a row
            n = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
            groups = builder.udiv(width, i64(16))
            isa = dot_kernels()
            dot = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(V16I, [V16I] * 3), "llvm.x86.avx512.vpdpwssd.512"
            )
            fma = vector_fma(builder, 16)
            column = builder.mul(block, i64(16))
            block_bytes = builder.gep(weights_.data, [builder.mul(block, builder.mul(width, i64(32)))])

            def run(r0: Any, count: int) -> None:
                x_rows = builder.gep(pairs_.data, [builder.mul(r0, width)])
                step_rows = builder.gep(steps_.data, [builder.mul(r0, groups)])

                def pair(r: int, step: Any) -> Any:
                    """Row r's 16-bit inputs 2 step and 2 step + 1 in every lane."""
                    x = builder.load(builder.gep(x_rows, [builder.add(builder.mul(i64(r), width), step)]))
                    return splat(builder, x, V16I)

                def step_body(step: Any, dots: list[Any]) -> None:  # 2 inputs a step, 32 a group
                    # byte 2j + t: column j's input 2 step + t, an integer of -127..127, widened to 16 bits
                    values = load_vector(builder, block_bytes, builder.mul(step, i64(32)), V32B, 1)
                    words = builder.sext(values, V32H)
                    for r, acc in enumerate(dots):
                        if isa == "avx512":
                            builder.store(
                                builder.call(dot, [builder.load(acc), builder.bitcast(words, V16I), pair(r, step)]),
                                acc,
                            )
                            continue
                        x = builder.bitcast(vector_half(builder, pair(r, step), 0), V16W)
                        halves = (
                            builder.call(madd(builder, "wd"), [vector_half(builder, words, h), x]) for h in (0, 1)
                        )
                        builder.store(builder.add(builder.load(acc), join_halves(builder, *halves)), acc)

                def group_end(g: Any, dots: list[Any], totals: list[Any]) -> None:
                    at = builder.mul(builder.add(builder.mul(block, groups), g), i64(16))
                    scale = load_vector(builder, scales_.data, at, V16F, 4)
                    for r, (acc, total) in enumerate(zip(dots, totals, strict=True)):
                        step = builder.load(builder.gep(step_rows, [builder.add(builder.mul(i64(r), groups), g)]))
                        unit = builder.fmul(scale, splat(builder, step, V16F))
                        dot_sum = builder.sitofp(builder.load(acc), V16F)
                        builder.store(builder.call(fma, [unit, dot_sum, builder.load(total)]), total)

                totals = _tile_groups(builder, count, groups, 16, ir.Constant(V16I, [0] * 16), step_body, group_end)
                _store_rows(builder, out_.data, r0, n, column, totals)

            for offset, count in _row_chunks(rows, isa):
                run(builder.add(first, i64(offset)), count)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def int4_a8_tile(rows: int) -> Callable[..., None]:
    """tile(inputs, sums, nibbles, scales, out, r0, block): out[r0 : r0 + rows, 16 block : 16 block + 16] (see
    int4_a8_matmul; inputs: the rows' 8-bit values, four to an int32), as LLVM vector code, the signature of
    int4_tile's. AVX-512 VNNI's vpdpbusd sums four byte products into an int32; AVX2 (dot_kernels()) takes two
    instructions for it: pmaddubsw sums two into an int16 (at most 2 x 15 x 127, a group's eight of them at
    most 30480: exact), and pmaddwd the group's int16s into int32s at its end. The same integers either way,
    and the same float arithmetic after them: the same result. scales: float16 bits (int16), or float32 where
    float16 would round them (a Q4_K group's scale, d * sc)."""

    def typer(typingctx: Any, inputs: Any, sums: Any, nibbles: Any, scales: Any, out: Any, r0: Any, block: Any) -> Any:
        sig = types.void(inputs, sums, nibbles, scales, out, r0, block)
        half = scales.dtype != types.float32

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrays, first, block = _tile_arguments(context, builder, signature, args)
            inputs_, sums_, nibbles_, scales_, out_ = arrays
            width = cgutils.unpack_tuple(builder, inputs_.shape, 2)[1]  # K / 4: 8-bit inputs in fours a row
            n = cgutils.unpack_tuple(builder, out_.shape, 2)[1]
            groups = builder.udiv(width, i64(8))
            isa = dot_kernels()
            dot = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(V16I, [V16I] * 3), "llvm.x86.avx512.vpdpbusd.512"
            )
            fma = vector_fma(builder, 16)
            column = builder.mul(block, i64(16))
            block_nibbles = builder.gep(nibbles_.data, [builder.mul(block, builder.mul(width, i64(32)))])
            low_nibbles = ir.Constant(V64B, [15] * 64)
            ones = ir.Constant(V16W, [1] * 16)

            def products(weights: Any, x: Any) -> Any:
                """AVX2: the 16 columns' sums of two byte products, as 32 int16s (x: four inputs in every lane)."""
                inputs = builder.bitcast(vector_half(builder, x, 0), V32B)
                halves = (builder.bitcast(vector_half(builder, weights, h), V32B) for h in (0, 1))
                return join_halves(builder, *(builder.call(madd(builder, "ub.sw"), [w, inputs]) for w in halves))

            def run(r0: Any, count: int) -> None:
                x_rows = builder.gep(inputs_.data, [builder.mul(r0, width)])
                sum_rows = builder.gep(sums_.data, [builder.mul(r0, builder.mul(groups, i64(2)))])

                def four(r: int, index: Any) -> Any:
                    """Row r's 8-bit inputs 4 index .. 4 index + 3 in every lane."""
                    x = builder.load(builder.gep(x_rows, [builder.add(builder.mul(i64(r), width), index)]))
                    return splat(builder, x, V16I)

                def step_body(step: Any, dots: list[Any]) -> None:  # 8 inputs a step, 32 a group
                    # byte 4j + t: column j's input 8 step + t (low nibble) and 8 step + 4 + t (high nibble)
                    raw = load_vector(builder, block_nibbles, builder.mul(step, i64(64)), V64B, 1)
                    low = builder.bitcast(builder.and_(raw, low_nibbles), V16I)
                    high = builder.lshr(builder.bitcast(raw, V16I), ir.Constant(V16I, [4] * 16))
                    high = builder.bitcast(builder.and_(builder.bitcast(high, V64B), low_nibbles), V16I)
                    index = builder.mul(step, i64(2))
                    for r, acc in enumerate(dots):
                        x_low, x_high = four(r, index), four(r, builder.add(index, i64(1)))
                        if isa == "avx512":
                            partial = builder.call(dot, [builder.load(acc), low, x_low])
                            builder.store(builder.call(dot, [partial, high, x_high]), acc)
                        else:
                            partial = builder.add(builder.load(acc), products(low, x_low))
                            builder.store(builder.add(partial, products(high, x_high)), acc)

                def group_end(g: Any, dots: list[Any], totals: list[Any]) -> None:
                    at = builder.mul(builder.add(builder.mul(block, groups), g), i64(32))  # scales[block, g]: 2 x 16
                    scale, low_bound = (float_lanes(builder, scales_.data, builder.add(at, i64(i)), 16, half)
                                        for i in (0, 16))  # fmt: skip
                    for r, (acc, total) in enumerate(zip(dots, totals, strict=True)):
                        at = builder.mul(builder.add(builder.mul(i64(r), groups), g), i64(2))
                        unit, group_sum = (builder.load(builder.gep(sum_rows, [builder.add(at, i64(i))]))
                                           for i in (0, 1))  # fmt: skip
                        dots_ = builder.load(acc)
                        if isa != "avx512":  # the int16 pairs' sums
                            halves = (
                                builder.call(madd(builder, "wd"), [vector_half(builder, dots_, h), ones])
                                for h in (0, 1)
                            )
                            dots_ = join_halves(builder, *halves)
                        scaled = builder.fmul(scale, splat(builder, unit, V16F))
                        part = builder.call(fma, [scaled, builder.sitofp(dots_, V16F), builder.load(total)])
                        builder.store(builder.call(fma, [low_bound, splat(builder, group_sum, V16F), part]), total)

                zero = ir.Constant(V16I, [0] * 16) if isa == "avx512" else ir.Constant(V32H, [0] * 32)
                totals = _tile_groups(builder, count, groups, 4, zero, step_body, group_end)
                _store_rows(builder, out_.data, r0, n, column, totals)

            for offset, count in _row_chunks(rows, isa):
                run(builder.add(first, i64(offset)), count)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def tiled(tiles: tuple[Callable[..., None], ...], top: int) -> Callable[..., None]:
    """run(pairs, sums, weights, scales, out): every tile of out (M, N), tasks of `top` rows by 16 columns in
    parallel, by tile kernels (int4_tile's or int8_tile's) of 1, 2, 4, 8 and `top` rows (the last rows in the
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
