"""How a projection's weights are held and multiplied on torch: dense, int4, int4-a8, int8 (per channel or in
exact groups of 32) and mixed, each a `Linear`; the token embedding at 8 bits or dense; the 4- and 8-bit group
quantizers and the checks that a checkpoint's weights are already such groups. Where the CPU runs the numba dot
kernels a `Linear` also holds their planes (`dot_linear`), which shared.backends.cpu_runner multiplies.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from shared.backends.cpu_runner import DotLinear
from shared.backends.kernels.isa import dot_kernels, int4_dot_supported
from shared.backends.kernels.rows import quantize_rows
from shared.backends.llama_config import INT4_GROUP, Kind
from shared.settings import Quantization

Groups8 = tuple[torch.Tensor, torch.Tensor]  # quantize_groups8's (q, d)
Groups4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # quantize_groups4's (q, scale, minimum)
FLOAT32_ROUNDING = 2.0**-20  # a few float32 ulps, relative: what recovering a float16 in float32 may be off by
FEW_ROWS = 4  # dense_stored: from this many rows its float32 weight beats its bfloat16 one (see there)
MIXED_ROWS = 8  # mixed: from this many rows int8 beats int4 here (16.3 vs 16.0 ms a step at 8, 22 vs 28 at 16)
# int8's inputs take 8 bits where the CPU has AVX-512 VNNI. Without it oneDNN multiplies unsigned 8-bit inputs by
# signed 8-bit weights with vpmaddubsw, which sums each pair of products in 16 bits and saturates past 32767
# (255 * 127 * 2 = 64770): on an AVX2 CPU an 8-row matmul came out up to 246 away from the exact integer product.
# With 7-bit inputs a pair stays within 127 * 127 * 2 = 32258 and the products are exact.
INT8_INPUT_TOP = 127 if getattr(torch.cpu, "_is_vnni_supported", lambda: False)() else 63
# The numba dot kernels' instructions on this CPU ("avx512", "avx2") or None: torch's int4pack kernel then (see
# Linear). One choice for the process, so every row count takes the same kernel.
DOT_KERNELS = dot_kernels()
INT4_DOT = int4_dot_supported()  # int4's bfloat16 kernel: AVX-512 BF16 as well


def _bfloat16_onednn() -> bool:
    """Whether torch multiplies bfloat16 through oneDNN on this CPU (x86 with AVX-512 or AMX, or arm64 with
    BF16); without it torch's own bfloat16 matmul is its slow fallback."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the query: as torch decides, bfloat16
        return True


BFLOAT16_ONEDNN = _bfloat16_onednn()


def dense_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of a dense projection's products of several rows, for a model in dtype: float32 instead of
    bfloat16 on a CPU where torch has no bfloat16 oneDNN (AVX2 without AVX-512). See dense_stored."""
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" and not BFLOAT16_ONEDNN else dtype


def dense_stored(weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> Linear:
    """A dense projection among quantized ones (auto keeps a GGUF's Q4_K and Q6_K so), for a model in dtype.
    Where dense_dtype is float32, FEW_ROWS rows or more multiply the float32 weight, exact and faster than torch's
    bfloat16 fallback (Gemma 3's o and down, 16 rows: 0.35 and 0.62 ms against 1.05 and 1.97 on a Zen 3 CPU),
    fewer a bfloat16 copy, as a step of a few rows is bound by reading the weights and float32's are twice the
    bytes. Gemma 3 270M's steps there: 1 row 16-17 ms against 17.5-18 in bfloat16 alone (float32 alone: 18-22),
    2 rows 20 (26), 8 rows 38-44 against 51-57, 16 rows 62-66 against 97-102. Both copies: 140 MB more than
    bfloat16 alone. (A weight whose shape a quantized kind does not take is one too: see Linear.)"""
    return Linear(weight, dtype, "none", device=device, among_quantized=True)


class Linear:
    """y = x @ W.T, with W dense (float32/bfloat16), packed to int4, or int8 with int8 activations.

    - none: W in the model dtype, inputs cast to it (and a copy for a few rows: see dense_stored).
    - int4: asymmetric 4-bit weights in groups of 32 along the input, bfloat16 activations (torch's int4pack
      kernel; fast with bfloat16 inputs only, 40x slower with float32). A GGUF's Q4_1 tensor (the same groups,
      a scale and a minimum) comes back to its own 4-bit values; only the scales round, to bfloat16.
    - int4-a8: the same 4-bit values, each group's scale and minimum in float16 (a Q4_1's own, exactly), and each
      input row quantized to 8 bits in groups of 32 when it arrives: llama.cpp's arithmetic for Q4_1, by integer
      dot products (int4_a8_matmul, where the CPU has AVX2 or AVX-512 VNNI: dot_kernels(); int4 elsewhere).
    - int8-groups: symmetric 8-bit weights in groups of 32 (GGUF's Q8_0): for the output head, which 4 bits would
      blur (see docs/engine.md). One pass of the 8-bit dot kernel (int8_matmul, 16-bit inputs) where
      dot_kernels() has one, else two of torch's int4 matmuls (high and low nibbles) with bfloat16 inputs.
    - int8: symmetric 8-bit weights per output channel, and each input row quantized to 8 bits with its own
      scale when it arrives; an integer matmul (VNNI) accumulates in int32, which is exact, so a row's result
      does not depend on the other rows in the batch.
    """

    few_rows: torch.Tensor | None = None  # none: W in another dtype for fewer than FEW_ROWS rows (dense_stored)

    def __init__(
        self,
        weight: torch.Tensor,
        dtype: torch.dtype,
        quantization: Kind,
        groups8: Groups8 | None = None,
        device: torch.device | None = None,
        groups4: Groups4 | None = None,
        dot: bool | None = None,
        among_quantized: bool = False,
    ) -> None:
        """groups8, groups4: quantize_groups8(weight) or quantize_groups4(weight) where the caller has them already
        (a tied embedding; auto's check). device: where dense weights live (the quantized kinds are CPU kernels).
        among_quantized: dense, but one of a quantized model's projections (dense_stored), as is a weight whose
        in_features a quantized kind does not take; what a packed file holds as dense (see restore).
        dot: planes for the numba dot kernels rather than torch's (default: where DOT_KERNELS has the kind's kernel;
        int4's needs AVX-512 BF16: INT4_DOT)."""
        self.out_features, self.in_features = weight.shape
        self.quantization = quantization
        if quantization in ("int4", "int4-a8", "int8-groups") and self.in_features % INT4_GROUP:
            self.quantization = "none"
        integer = bool(DOT_KERNELS) if dot is None else dot  # int4-a8's and the head's kernels
        if self.quantization == "int4-a8" and not (integer and self.out_features % 16 == 0):  # 8-bit inputs need them
            self.quantization = "int4"
        self.dot = self.out_features % 16 == 0 and (
            (INT4_DOT if dot is None else dot) if self.quantization == "int4" else integer
        )
        plane = _dot_plane if self.dot else _int4_plane
        if self.quantization in ("int4", "int4-a8"):
            # Asymmetric 4-bit per group: w = (q - 8) * scale + zero, q in 0..15 (torch's int4pack layout).
            q, scale, lo = (t.unsqueeze(-1) for t in groups4 or quantize_groups4(weight))
            q = q.to(torch.int32).reshape(self.out_features, -1)
            self.planes = [
                _a8_plane(q, scale, lo, stored=groups4 is not None)
                if self.quantization == "int4-a8"
                else plane(q, scale, lo + 8 * scale)
            ]
            self.dtype = torch.bfloat16
        elif self.quantization == "int8-groups" and self.dot:
            self.planes = [_int8_plane(*(groups8 or quantize_groups8(weight)))]  # one pass over the 8-bit values
            self.dtype = torch.bfloat16
        elif self.quantization == "int8-groups":
            # w = d * q = 16d * (hi - 8) + d * (lo - 8) + 8d, for q + 128 = 16 hi + lo: two int4 planes.
            q, d = groups8 or quantize_groups8(weight)
            u = q.to(torch.int32).reshape(self.out_features, -1) + 128  # 1..255
            d = d.unsqueeze(-1)  # (N, K/G, 1)
            self.planes = [plane(u >> 4, 16 * d, torch.zeros_like(d)), plane(u & 15, d, 8 * d)]
            self.dtype = torch.bfloat16
        elif self.quantization == "int8":
            w = weight.float()
            self.scale = w.abs().amax(1).clamp(min=1e-8) / 127  # (N,)
            if not hasattr(torch.ops.onednn, "qlinear_prepack"):  # e.g. a torch build without oneDNN
                raise RuntimeError("int8 and mixed quantization need torch's oneDNN int8 kernels (x86 builds)")
            self.packed = torch.ops.onednn.qlinear_prepack((w / self.scale[:, None]).round().to(torch.int8), None)
            self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
            self.dtype = torch.float32
        else:
            self._dense(weight, dtype, device, among_quantized or quantization != "none")
        self.dot_linear = self._dot_linear()

    def _dense(self, weight: torch.Tensor, dtype: torch.dtype, device: torch.device | None, among: bool) -> None:
        """W in dtype, inputs cast to it; among quantized projections in dense_dtype's, with a copy in dtype for
        fewer than FEW_ROWS rows where that differs (dense_stored), and a float32 weight aligned for one row."""
        wide = dense_dtype(dtype, weight.device if device is None else device) if among else dtype
        self.weight = weight.to(device=device, dtype=wide).contiguous()
        self.dtype = wide  # what inputs are cast to, and outputs come in
        if wide != dtype:
            self.few_rows = weight.to(device=device, dtype=dtype).contiguous()  # no copy if already so (restore)
        elif among:  # one row reads it: where restore puts it
            self.weight = aligned(self.weight)

    def _dot_linear(self) -> DotLinear | None:
        """The numba dot kernels' projection over these planes (numpy arrays of the same memory), or None."""
        if not self.dot or self.quantization not in ("int4", "int4-a8", "int8-groups"):
            return None

        def bits(sz: torch.Tensor) -> np.ndarray:  # float16's and bfloat16's as int16 bits (numba has neither)
            return (sz.view(torch.int16) if sz.dtype in (torch.float16, torch.bfloat16) else sz).numpy()

        return DotLinear(self.quantization, [(p.numpy(), bits(sz)) for p, _, sz in self.planes], self.out_features)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors the kernels read, to save (see PackedWeights); int8's oneDNN-packed weight is opaque."""
        if self.quantization == "none":
            return {"weight": self.weight}
        if self.quantization == "int8":
            raise ValueError("int8 weights are packed by oneDNN and are not saved")
        tensors: dict[str, torch.Tensor] = {}
        name = {"int8-groups": "bytes", "int4-a8": "nibbles"}.get(self.quantization, "quads") if self.dot else "plane"
        for j, (packed, _, sz) in enumerate(self.planes):
            tensors.update({f"{name}{j}": packed, f"sz{j}": sz})
        return tensors

    @classmethod
    def restore(cls, kind: Kind, dtype: torch.dtype, tensors: dict[str, torch.Tensor]) -> Linear:
        """The Linear whose state() these tensors are."""
        self = cls.__new__(cls)
        self.quantization = kind
        if kind == "none":
            saved = tensors["weight"]  # among quantized ones: in the model's dtype, or dense_dtype's where packed
            if saved.dtype != dtype:  # as _dense keeps it (mapped: only several rows read it)
                self.weight, self.dtype, self.few_rows = saved, saved.dtype, saved.to(dtype)
            else:  # packed in the model's dtype (where dense_dtype is that, e.g. an image's build host): as _dense
                self._dense(saved, dtype, None, among=True)
            self.out_features, self.in_features = self.weight.shape
            self.dot, self.dot_linear = False, None
            return self
        name = next(n for n in ("quads", "bytes", "nibbles", "plane") if f"{n}0" in tensors)
        self.dot = name != "plane"
        self.planes = [(tensors[f"{name}{j}"], INT4_GROUP, tensors[f"sz{j}"]) for j in range(len(tensors) // 2)]
        self.dtype = torch.bfloat16
        sz = self.planes[0][2]  # the dot kernels' (N/16, K/G, 16[, 2]) or (N/16, K/G, 2, 16), torch's (K/G, N, 2)
        self.out_features, groups = (sz.shape[0] * 16, sz.shape[1]) if self.dot else (sz.shape[1], sz.shape[0])
        self.in_features = groups * INT4_GROUP
        self.dot_linear = self._dot_linear()  # after out_features, which it reads
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) in any float dtype; the result (N, out) in self.dtype (float32 from the dot kernel)."""
        if self.dot_linear is not None:  # float32 rows in: the kernels round or quantize them themselves
            return torch.from_numpy(self.dot_linear(x.float().contiguous().numpy()))
        if self.quantization == "int8":
            q, s = quantize_rows(x.float().contiguous().numpy(), INT8_INPUT_TOP)  # (N, in): top + 1 + round(x / s)
            y = torch.ops.onednn.qlinear_pointwise(
                torch.from_numpy(q), 1.0, INT8_INPUT_TOP + 1, self.packed, self.scale, self.zero_points, None, 1.0,
                0, torch.float32, "none", [], "",
            )  # fmt: skip
            return y.mul_(torch.from_numpy(s))
        if self.few_rows is not None and x.shape[0] < FEW_ROWS:
            return dense_linear(x.to(self.few_rows.dtype), self.few_rows)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.quantization in ("int4", "int8-groups"):
            y = torch._weight_int4pack_mm_for_cpu(x, *self.planes[0])
            for plane in self.planes[1:]:
                y = y.float() + torch._weight_int4pack_mm_for_cpu(x, *plane)
            return y
        return dense_linear(x, self.weight)


def aligned(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight at a 64-byte boundary, copied where it is not: torch's one-row float32 matmul (MKL's gemv)
    adds in another order at another alignment, so a dense weight's products would depend on where it was read
    from (the checkpoint's buffers, or the packed file, whose tensors lie at any multiple of 8 bytes). Its
    products of more rows, and bfloat16's, came out the same at every offset."""
    return weight if weight.dtype != torch.float32 or weight.data_ptr() % 64 == 0 else weight.clone()


_ONEDNN_FLAG = threading.Lock()  # held while oneDNN is off for one row, so no other runner's matmul sees it off


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. A single bfloat16 or float16 row on the CPU goes to torch's own vector kernel (a dot product a
    row of the weight, in float32) instead of oneDNN, which torch picks for every reduced-precision matmul and
    which reads a one-row product's weight at half the memory's speed: Gemma 3's 262k x 640 output head took
    21-27 ms for one row through oneDNN and 11.8 through the vector kernel (docs/engine.md, "Speed"). oneDNN
    stays for more rows (16 rows: 40 against 157 ms). torch chooses between them by a process-wide flag, so
    the flag is turned off for that one call, under a lock that every runner's reduced-precision CPU matmul
    takes."""
    if x.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return F.linear(x, weight)
    with _ONEDNN_FLAG:
        if x.shape[0] != 1 or not torch.backends.mkldnn.enabled:
            return F.linear(x, weight)
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a property of the module
        try:
            return F.linear(x, weight)
        finally:
            torch.backends.mkldnn.enabled = True  # type: ignore[assignment]  # a property of the module


def _int4_plane(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The int4pack kernel's arguments after x for w = (q - 8) * scale + zero: q (N, K) 0..15, scale and zero
    (N, K/G, 1) per group of INT4_GROUP along the input."""
    sz = torch.cat([scale, zero], dim=-1).transpose(0, 1)  # (K/G, N, 2)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), INT4_GROUP, sz.contiguous().to(torch.bfloat16)


def _dot_plane(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The int4 dot kernel's plane (DotLinear) for w = (q - 8) * scale + zero, from _int4_plane's arguments: q
    (N, K) 0..15, its values packed in 32 bytes per 16 columns and 4 inputs (byte 2j + h of step s holds column j's
    inputs 4s + h in its low and 4s + h + 2 in its high nibble, so that widening the bytes to words gives the
    kernel the pairs of its dot products), and scale and zero in bfloat16 (N/16, K/G, 16, 2): a block of 16
    columns reads its scales in one run, as it reads its values (1.2-1.3x faster at one row than torch's
    (K/G, N, 2), whose groups lie N * 4 bytes apart)."""
    n, k = q.shape
    nibbles = q.to(torch.uint8).reshape(n // 16, 16, k // 4, 2, 2)  # (column block, j, step, low/high, h)
    quads = nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)  # (block, j, step, h)
    sz = torch.cat([scale, zero], dim=-1).reshape(n // 16, 16, -1, 2).transpose(1, 2)  # (block, K/G, j, 2)
    return quads.permute(0, 2, 1, 3).contiguous().reshape(n, k // 2), INT4_GROUP, sz.contiguous().to(torch.bfloat16)


def _a8_plane(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, stored: bool = False
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """int4_a8_matmul's plane for w = q * scale + low: q (N, K) 0..15 packed in 64 bytes per 16 columns and 8
    inputs (byte 4j + t of step s holds column j's input 8s + t in its low and 8s + 4 + t in its high nibble, so
    that an `and` and a shift give the kernel two steps' 4 bytes a lane), and scale and low (N, K/G[, 1]) in
    float16 (N/16, K/G, 2, 16): a Q4_1 group's scale and minimum are float16s (found within float32's rounding of
    them), which this keeps exactly. stored: the groups are a checkpoint's own (not a rounding made here), kept in
    float32 where float16 would round them further (a Q4_K group's scale, d * sc, has up to 17 significant bits)."""
    n, k = q.shape
    nibbles = q.to(torch.uint8).reshape(n // 16, 16, k // 8, 2, 4)  # (column block, j, step, low/high, t)
    packed = (nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)).permute(0, 2, 1, 3)  # (block, step, j, t)
    pairs = torch.stack([scale.reshape(n // 16, 16, -1), low.reshape(n // 16, 16, -1)], dim=2)  # (block, j, 2, K/G)
    scales = pairs.permute(0, 3, 2, 1).contiguous().float()
    half = scales.to(torch.float16)
    rounded = stored and bool(((half.float() - scales).abs() > FLOAT32_ROUNDING * scales.abs()).any())
    return packed.contiguous().reshape(n, k // 2), INT4_GROUP, scales if rounded else half


def _int8_plane(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """int8_matmul's plane for w = q * d, from quantize_groups8's q (N, K/G, G) and d (N, K/G): the values in 32
    bytes per 16 columns and 2 inputs (byte 2j + t of step s is column j's input 2s + t, so that converted to
    bfloat16 they are the pairs of its dot products), and d in float32 (N/16, K/G, 16), a block's scales in one
    run: a Q8_0 scale is a float16, which float32 holds exactly (bfloat16 would round it)."""
    n = q.shape[0]
    values = q.reshape(n // 16, 16, -1, 2).permute(0, 2, 1, 3)  # (column block, step, j, t)
    scales = d.float().reshape(n // 16, 16, -1).transpose(1, 2)  # (block, K/G, j)
    return values.contiguous().reshape(n, -1), INT4_GROUP, scales.contiguous()


def quantize_groups4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) to 4 bits in groups of 32 along K: q uint8 0..15 (N, K/G, G), scale and minimum float32
    (N, K/G), w = scale * q + minimum.

    The rule of GGUF's Q4_1 (the group's minimum, and (max - min) / 15), so a Q4_1 tensor's de-quantised values
    come back to their own q, scale and minimum: no second rounding.
    """
    w = weight.float().reshape(weight.shape[0], -1, INT4_GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((w - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    return q, scale, lo


def lossless_at_4_bits(weight: torch.Tensor, groups: Groups4) -> bool:
    """Whether its quantize_groups4 groups give this weight back within a thousandth of a step: it is 4-bit groups
    of 32 already (a GGUF's Q4_0 or Q4_1), so int4 adds no rounding of its own. A Q4_K or Q6_K tensor, or float
    weights, would round a second time."""
    q, scale, lo = groups
    error = q.float().mul_(scale.unsqueeze(-1)).add_(lo.unsqueeze(-1)).sub_(weight.float().reshape(q.shape)).abs_()
    return bool((error <= 1e-3 * scale.unsqueeze(-1)).all())


def exact_groups4(weight: torch.Tensor) -> Groups4 | None:
    """weight (N, K)'s own 4-bit groups of 32 along K, where each group is scale * q + low for integers q in 0..15
    with its own scale and low: a GGUF's Q4_K (each sub-block's d * sc and -dmin * m; Q4_1 too); q, scale, low
    as quantize_groups4's, exactly (within a thousandth of a step). A group's step is its smallest gap between
    values, or a fraction of it (values only q apart by 2 or more); a group of one value has step 1 and q 0. None
    for any other weight (Q6_K, Q5_K, float weights), which 4 bits would round."""
    if weight.shape[1] % INT4_GROUP:
        return None
    n = weight.shape[0]
    w = weight.float().reshape(n, -1, INT4_GROUP)
    lo = w.amin(-1, keepdim=True)
    span = w - lo
    values = span.sort(-1).values
    gaps = values.diff(dim=-1)
    noise = 1e-3 * values[..., -1:] / 15  # rounding between equal values, well under a step
    steps = gaps > noise
    if bool((steps.sum(-1) > 15).any()):  # more than 16 values in a group (Q6_K's 64 levels): no search
        return None
    gap = torch.where(steps, gaps, torch.inf).amin(-1, keepdim=True)
    gap = torch.where(gap.isinf(), 1.0, gap)  # one value: any step
    q = torch.zeros(w.shape, dtype=torch.uint8)
    scale = torch.zeros(lo.shape)
    found = torch.zeros(lo.shape, dtype=torch.bool)
    for fraction in range(1, 16):
        step = gap / fraction
        k = (span / step).round_()
        exact = ((k * step - span).abs_().le(1e-3 * step) & k.le(15)).all(-1, keepdim=True) & ~found
        q = torch.where(exact, k.to(torch.uint8), q)
        scale = torch.where(exact, step, scale)
        found |= exact
        if bool(found.all()):
            return q, scale.squeeze(-1), lo.squeeze(-1)
    return None


def exact_groups8(weight: torch.Tensor) -> Groups8 | None:
    """weight (N, K)'s own 8-bit groups of 32 along K, where each group is d * k for integers |k| <= 127: a GGUF's
    Q8_0, Q5_0 or Q4_0 tensor, whose largest magnitude in a group is 127, 16 or 8 steps (llama.cpp's rules); q
    int8 (N, K/G, G) and d float32 (N, K/G) as quantize_groups8's, exactly (within a thousandth of a step).
    None for any other weight (Q4_K, Q6_K, float weights), which 8 bits would round."""
    if weight.shape[1] % INT4_GROUP:
        return None
    n = weight.shape[0]
    w = weight.float().reshape(n, -1, INT4_GROUP)
    top = w.abs().amax(-1)
    q = torch.zeros(w.shape, dtype=torch.int8)
    d = torch.zeros(top.shape)
    found = torch.zeros(top.shape, dtype=torch.bool)
    for steps in (127, 16, 8):
        step = (top / steps).unsqueeze(-1)
        k = (w / step.clamp(min=1e-30)).round_()
        exact = (k * step - w).abs_().le_(1e-3 * step).all(-1) & ~found
        q[exact], d[exact] = k[exact].to(torch.int8), step.squeeze(-1)[exact]
        found |= exact
        if found.all():
            return q, d
    return None


def quantize_groups8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) to 8 bits in groups of 32 along K: q int8 (N, K/G, G) and d float32 (N, K/G), w = d * q.

    The rule of GGUF's Q8_0 (d = max |w| / 127 in each group, q = round(w / d)), so a Q8_0 tensor's de-quantised
    values come back to their own q and d: no second rounding.
    """
    n = weight.shape[0]
    w = weight.float().reshape(n, -1, INT4_GROUP)
    d = w.abs().amax(-1) / 127
    q = (w / d.clamp(min=1e-30).unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q, d


class Embedding:
    """The token embedding table: dense in the model dtype, or at 8 bits in groups of 32 (half bfloat16's memory,
    and exact for a GGUF's Q8_0 table), de-quantised row by row as tokens are looked up."""

    def __init__(
        self, weight: torch.Tensor, dtype: torch.dtype, groups8: Groups8 | None, device: torch.device | None = None
    ) -> None:
        """groups8: quantize_groups8(weight) for the 8-bit table (CPU), None for the dense one (on device)."""
        self.dense = None if groups8 else weight.to(device=device, dtype=dtype)
        self.device = device
        if groups8:
            self.q, self.d = groups8

    def __call__(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """The float32 rows (N, C) of these tokens (a tensor of them already on the device, or a list)."""
        ids = torch.as_tensor(token_ids, device=self.device)
        if self.dense is not None:
            return F.embedding(ids, self.dense).float()
        return (self.q[ids].float() * self.d[ids].unsqueeze(-1)).flatten(1)


class MixedLinear:
    """int4 weights for a few rows, int8 for many: both copies, picked per call by the number of rows.

    A decode step of a few rows is bound by reading the weights, and int4 reads half int8's bytes; from
    MIXED_ROWS rows the step is bound by arithmetic, where int8 x int8 integer matmuls are faster than
    int4's, 2x so for a 256-token prefill chunk.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, few: Kind, groups8: Groups8 | None = None) -> None:
        self.out_features = weight.shape[0]
        self.few, self.many = Linear(weight, dtype, few, groups8), Linear(weight, dtype, "int8")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.many(x) if x.shape[0] >= MIXED_ROWS else self.few(x)


def linear(
    weight: torch.Tensor,
    dtype: torch.dtype,
    quantization: Quantization,
    head: bool = False,
    groups8: Groups8 | None = None,
    device: torch.device | None = None,
    groups4: Groups4 | None = None,
) -> Linear | MixedLinear:
    """A projection under the quantization asked for. The output head is kept at 8 bits where the layers take
    4: 4-bit logits moved the next-token distribution 50x further from the weights' own (KL 0.052 against
    0.0010 nats, `python -m loadtests.faithfulness`), for 1 of a step's ~30 matmuls."""
    four: Kind = "int8-groups" if head else "int4-a8" if quantization == "int4-a8" else "int4"
    if quantization == "mixed":
        return MixedLinear(weight, dtype, four, groups8)
    if quantization == "auto":
        raise ValueError("quantization 'auto' is resolved by the runner, per model")
    return Linear(
        weight, dtype, four if quantization in ("int4", "int4-a8") else quantization, groups8, device, groups4
    )
