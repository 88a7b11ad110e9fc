"""Llama-family decoder for batched serving on torch: static KV cache, batched decode, optional int4 weights.

One readable file (nanoGPT-style). Loads the Hugging Face layout (config.json + model.safetensors) that
`shared.sources` produces, so it serves SmolLM2 and other `model_type: llama` checkpoints. The KV cache is
allocated once, `slots` sequences by `max_len` positions; the engine keeps its running sequences in slots
0..n-1 so that a decode step reads the cache through views, never a gather. Here the weights are read, checked
and quantized (torch), and the model runs as torch ops on any device (LlamaRunner); on the CPU it runs in
shared.backends.cpu_runner (numpy and the numba kernels), which `runner` picks.
Shapes: B batch, T new tokens, S slots, H query heads, K kv heads, D head dim, C hidden, P cached positions.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from shared.backends import BatchSteps, Chunk, step_rows
from shared.backends.cpu_runner import (
    ByteEmbedding,
    CpuRunner,
    CpuWeights,
    DotLinear,
    Projection,
    rope_tables,
)
from shared.backends.cpu_runner import load as load_cpu_runner
from shared.backends.kernels import dot_kernels, int4_dot_supported, quantize_rows
from shared.backends.llama_config import INT4_GROUP, Kind, Layer, LlamaConfig, Weights
from shared.backends.packed import PackedWeights
from shared.settings import Quantization

log = logging.getLogger(__name__)

Groups8 = tuple[torch.Tensor, torch.Tensor]  # quantize_groups8's (q, d)
Groups4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # quantize_groups4's (q, scale, minimum)
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


class Linear:
    """y = x @ W.T, with W dense (float32/bfloat16), packed to int4, or int8 with int8 activations.

    - none: W in the model dtype, inputs cast to it.
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

    def __init__(
        self,
        weight: torch.Tensor,
        dtype: torch.dtype,
        quantization: Kind,
        groups8: Groups8 | None = None,
        device: torch.device | None = None,
        groups4: Groups4 | None = None,
        dot: bool | None = None,
    ) -> None:
        """groups8, groups4: quantize_groups8(weight) or quantize_groups4(weight) where the caller has them already
        (a tied embedding; auto's check). device: where dense weights live (the quantized kinds are CPU kernels).
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
                _a8_plane(q, scale, lo) if self.quantization == "int4-a8" else plane(q, scale, lo + 8 * scale)
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
            self.weight = weight.to(device=device, dtype=dtype).contiguous()
            self.dtype = dtype  # what inputs are cast to, and outputs come in
        self.dot_linear = self._dot_linear()

    def _dot_linear(self) -> DotLinear | None:
        """The numba dot kernels' projection over these planes (numpy arrays of the same memory), or None."""
        if not self.dot or self.quantization not in ("int4", "int4-a8", "int8-groups"):
            return None
        bits = (lambda t: t.numpy()) if self.quantization == "int8-groups" else (lambda t: t.view(torch.int16).numpy())
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
            self.weight, self.dtype = tensors["weight"], dtype
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
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.quantization in ("int4", "int8-groups"):
            y = torch._weight_int4pack_mm_for_cpu(x, *self.planes[0])
            for plane in self.planes[1:]:
                y = y.float() + torch._weight_int4pack_mm_for_cpu(x, *plane)
            return y
        return dense_linear(x, self.weight)


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


def _a8_plane(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """int4_a8_matmul's plane for w = q * scale + low: q (N, K) 0..15 packed in 64 bytes per 16 columns and 8
    inputs (byte 4j + t of step s holds column j's input 8s + t in its low and 8s + 4 + t in its high nibble, so
    that an `and` and a shift give the kernel two steps' 4 bytes a lane), and scale and low (N, K/G[, 1]) in
    float16 (N/16, K/G, 2, 16): a Q4_1 group's scale and minimum are float16s, which this keeps exactly."""
    n, k = q.shape
    nibbles = q.to(torch.uint8).reshape(n // 16, 16, k // 8, 2, 4)  # (column block, j, step, low/high, t)
    packed = (nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)).permute(0, 2, 1, 3)  # (block, step, j, t)
    pairs = torch.stack([scale.reshape(n // 16, 16, -1), low.reshape(n // 16, 16, -1)], dim=2)  # (block, j, 2, K/G)
    scales = pairs.permute(0, 3, 2, 1).contiguous().to(torch.float16)
    return packed.contiguous().reshape(n, k // 2), INT4_GROUP, scales


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

    def __call__(self, token_ids: list[int]) -> torch.Tensor:
        """The float32 rows (N, C) of these tokens."""
        ids = torch.tensor(token_ids, device=self.device)
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


def _visible(keys: torch.Tensor, queries: torch.Tensor, window: int) -> torch.Tensor:
    """Which key positions each query position sees: causal, and within the last `window` when window > 0."""
    seen = keys <= queries
    return seen & (keys > queries - window) if window else seen


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy: a view would keep the whole memory-mapped checkpoint resident (540 MB for SmolLM2)."""
    return t.to(device=device, dtype=torch.float32, copy=True)


def _biased(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.float() + bias


@dataclass(frozen=True)
class Rope:
    """One rotary base's tables on the device, (P, D): x * cos + (x2, x1) * signed_sin (see rope_tables)."""

    cos: torch.Tensor
    signed_sin: torch.Tensor


TorchWeights = Weights[torch.Tensor, Linear | MixedLinear, Embedding]


def _rope(theta: float, head_dim: int, length: int, device: torch.device) -> Rope:
    cos, signed_sin = rope_tables(theta, head_dim, length)
    return Rope(torch.from_numpy(cos).to(device), torch.from_numpy(signed_sin).to(device))


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

    if quantization == "int4-a8" and not DOT_KERNELS:
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
        projections = [k for k in w if k.endswith("proj.weight")]
        exact = dev.type == "cpu" and not any(w[k].shape[1] % INT4_GROUP for k in projections)
        for k in projections if exact else []:
            groups4[k] = quantize_groups4(w[k])
            if not (exact := lossless_at_4_bits(w[k], groups4[k])):
                break
        if not exact:
            groups4.clear()
            # Other GGUF blocks: the 8-bit kernel keeps Q8_0, Q5_0 and Q4_0 exactly, given an 8-bit table too
            as_stored = dev.type == "cpu" and bool(DOT_KERNELS) and (groups := exact_groups8(embed)) is not None
        quantization = ("int4-a8" if DOT_KERNELS else "int4") if exact or as_stored else "none"
        state = "are" if exact else f"are not: weights in {str(dtype).removeprefix('torch.')}"
        if not as_stored:
            log.info("quantization auto: %s (layer weights %s 4-bit groups already)", quantization, state)
    if quantization != "none" and groups is None:
        groups = quantize_groups8(embed)
    embedding = Embedding(embed, dtype, groups, dev)
    if c.tie_word_embeddings or "lm_head.weight" not in w:  # one table: a dense one serves both (Gemma: 335 MB)
        tied = embed if embedding.dense is None else embedding.dense
        lm_head = linear(tied, dtype, quantization, head=True, groups8=groups, device=dev)
    elif as_stored:  # its own table: at 8 bits where it is stored so, else dense
        head = w["lm_head.weight"]
        exact8 = exact_groups8(head)
        lm_head = Linear(head, dtype, "none" if exact8 is None else "int8-groups", exact8, dev)
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
            exact8 = exact_groups8(weight)
            kind: Kind = "int8-groups" if exact8 is not None and weight.shape[0] % 16 == 0 else "none"
            kinds[kind] = kinds.get(kind, 0) + 1
            return Linear(weight, dtype, kind, exact8, dev)
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
        found = ", ".join(f"{n} {'8-bit groups' if k == 'int8-groups' else str(dtype).removeprefix('torch.')}"
                          for k, n in sorted(kinds.items()))  # fmt: skip
        head_kind = "8 bits" if isinstance(lm_head, Linear) and lm_head.quantization == "int8-groups" else "dense"
        log.info("quantization auto: as stored, per projection (%s; the head %s, as stored)", found, head_kind)
    return Weights(quantization, embedding, lm_head, norm("norm.weight"), layers)


class LlamaRunner(BatchSteps):
    """The model plus its KV cache as torch ops, on any torch device. Not thread-safe: one engine drives it.

    One code path for the model's math on any torch device (the CPU's default, shared.backends.cpu_runner, runs
    the same model through numba kernels): scaled_dot_product_attention (flash or memory-efficient kernels where
    the device has them), torch's rms_norm, over a cache in the model dtype allocated once. Weights, embedding,
    sampling inputs and the engine are the same for both.
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
        shape = (c.num_layers, 2, slots, c.num_kv_heads, self.context_length, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=dev)  # one allocation in the model dtype, once
        ropes = {t: _rope(t, c.head_dim, self.context_length, dev) for t in set(c.layer_rope_thetas)}
        self._ropes = [ropes[t] for t in c.layer_rope_thetas]  # each layer's tables
        self._embed_scale = float(np.float32(c.hidden_size**0.5)) if c.gemma else None  # as float32 weights get

    def move_slot(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Copy a sequence's cache to another slot (the engine compacts its running set, the prefix cache keeps
        it), from position `start` when dst holds the ones before already."""
        self.kv_cache[:, :, dst, :, start:length] = self.kv_cache[:, :, src, :, start:length]

    def release_slot(self, slot: int) -> None:
        """Nothing: a device's cache stays allocated."""

    @torch.inference_mode()
    def _logits(self, token_ids: list[int], positions: np.ndarray, chunk: Chunk | None) -> np.ndarray:
        """Logits for B decode rows (slots 0..B-1, one token each) and the last token of a prompt chunk.

        Every per-token step works on (N, features) rows, decode rows first, then the chunk's. The residual
        stream, norms, rotation and attention are float32 whatever the weights; only matmul inputs are cast.
        """
        c = self.config
        b, t = len(token_ids), len(chunk.token_ids) if chunk else 0
        n, q_width, k_width = b + t, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        scale = float(np.float32(c.attention_scale or c.head_dim**-0.5))
        x = self.embed(token_ids + (chunk.token_ids if chunk else []))
        if self._embed_scale is not None:
            x = x * self._embed_scale
        slots, rows = step_rows(positions, chunk)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.attn_norm)).float()  # (N, Q+2KV)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            if layer.q_norm is not None and layer.k_norm is not None:  # per head, before the rotation
                qkv[:, :q_width] = self._norm(qkv[:, :q_width].reshape(-1, c.head_dim), layer.q_norm).view(n, -1)
                k = qkv[:, q_width : q_width + k_width].reshape(-1, c.head_dim)
                qkv[:, q_width : q_width + k_width] = self._norm(k, layer.k_norm).view(n, -1)
            attn = self._attend(i, qkv, slots, rows, b, self._ropes[i], c.layer_windows[i] or 0, scale)
            out = _biased(layer.o(attn), layer.o_bias)  # bfloat16 outputs add as float32
            x = x + (out if layer.attn_out_norm is None else self._norm(out.float(), layer.attn_out_norm))
            gate, up = _biased(layer.gate_up(self._norm(x, layer.mlp_norm)), layer.gate_up_bias).chunk(2, -1)
            act = F.gelu(gate.float(), approximate="tanh") if c.gemma else F.silu(gate)
            out = _biased(layer.down(act * up), layer.down_bias)
            x = x + (out if layer.mlp_out_norm is None else self._norm(out.float(), layer.mlp_out_norm))
        if chunk:
            x = torch.cat([x[:b], x[-1:]])  # a chunk samples its last position only
        return self.lm_head(self._norm(x, self.norm)).float().cpu().numpy()  # (B, vocab)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of float32 rows (N, C)."""
        return F.rms_norm(x, (x.shape[-1],), weight, self._eps)

    def _attend(
        self,
        layer: int,
        qkv: torch.Tensor,
        slots: np.ndarray,
        rows: np.ndarray,
        b: int,
        rope: Rope,
        window: int,
        scale: float,
    ) -> torch.Tensor:
        """The torch ops of the attention kernel: rotation, the cache write, then attention of the decode rows
        (slots 0..b-1, each over its own positions) and of the chunk's rows (one slot, causal): (N, Q). With
        window > 0 a row sees only its last `window` positions."""
        c = self.config
        n, heads, kv_heads, dim = qkv.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        positions, at = torch.from_numpy(rows).to(self.device), torch.from_numpy(slots).to(self.device)
        rotated = qkv[:, : (heads + kv_heads) * dim].view(n, heads + kv_heads, dim)
        cos, sin = rope.cos[positions].unsqueeze(1), rope.signed_sin[positions].unsqueeze(1)  # (N, 1, D)
        rotated = rotated * cos + rotated.roll(dim // 2, -1) * sin  # rotate-half; the sign lives in the table
        q, k = rotated[:, :heads].to(self.dtype), rotated[:, heads:]
        cache = self.kv_cache[layer]  # (2, S, K, P, D)
        cache[0, at, :, positions] = k.to(cache.dtype)  # (N, K, D) at each row's slot and position
        cache[1, at, :, positions] = qkv[:, (heads + kv_heads) * dim :].view(n, kv_heads, dim).to(cache.dtype)
        out = torch.empty(n, heads, dim, dtype=self.dtype, device=self.device)
        if b:
            length = int(rows[:b].max()) + 1
            visible = _visible(torch.arange(length, device=self.device), positions[:b, None], window)  # (B, L)
            out[:b] = F.scaled_dot_product_attention(
                q[:b].unsqueeze(2), cache[0, :b, :, :length], cache[1, :b, :, :length],
                attn_mask=visible[:, None, None], enable_gqa=True, scale=scale,
            ).squeeze(2)  # fmt: skip
        if n > b:
            slot, end = int(slots[b]), int(rows[-1]) + 1
            keys, values = cache[:, slot : slot + 1, :, :end]  # (1, K, end, D)
            visible = _visible(torch.arange(end, device=self.device), positions[b:, None], window)  # (T, end)
            out[b:] = F.scaled_dot_product_attention(
                q[b:].transpose(0, 1).unsqueeze(0), keys, values, attn_mask=visible[None, None], enable_gqa=True,
                scale=scale,
            )[0].transpose(0, 1)  # fmt: skip
        return out.reshape(n, heads * dim).float()


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
