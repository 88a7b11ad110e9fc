"""A torch runner's step on its device: each row's token, slot and position and what every layer derives from them,
made once a step (DeviceStep), and decode steps replayed as CUDA graphs (DecodeGraphs).

Shapes: N rows (B decode rows, then a chunk's T), P cached positions, D head dim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from shared.backends.cpu_runner import rope_tables

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE, CUDAGraph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rope:
    """One rotary base's tables on the device, (P, D): x * cos + (x2, x1) * signed_sin (see rope_tables)."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    @classmethod
    def on(cls, device: torch.device, theta: float, head_dim: int, length: int) -> Rope:
        cos, signed_sin = rope_tables(theta, head_dim, length)
        return cls(torch.from_numpy(cos).to(device), torch.from_numpy(signed_sin).to(device))


def _visible(keys: torch.Tensor, queries: torch.Tensor, window: int) -> torch.Tensor:
    """Which key positions each query position sees: causal, and within the last `window` when window > 0."""
    seen = keys <= queries
    return seen & (keys > queries - window) if window else seen


@dataclass(frozen=True)
class DeviceStep:
    """A step's rows on the device, made once a step for every layer to read (one host-to-device copy, where a
    copy a layer would wait for the device each time): each row's token, slot and position, each rotary base's
    tables at those positions, and each attention window's masks."""

    token_ids: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    rotations: dict[float, tuple[torch.Tensor, torch.Tensor]]  # theta -> cos, signed_sin (N, 1, D)
    decode_masks: dict[int, torch.Tensor]  # window -> (B, 1, 1, L): what each decode row sees of its L positions
    chunk_masks: dict[int, torch.Tensor]  # window -> (1, 1, T, end): what the chunk's rows see of theirs
    chunk_slot: int

    @classmethod
    def of(
        cls,
        rows: torch.Tensor,
        b: int,
        decode_keys: torch.Tensor | None,
        chunk_keys: torch.Tensor | None,
        ropes: dict[float, Rope],
        windows: set[int],
        chunk_slot: int = 0,
    ) -> DeviceStep:
        """rows (3, N) on the device: tokens, slots, positions (decode rows first, b of them); the key positions
        the decode rows and the chunk's attend over (arange(L), arange(end))."""
        ids, at, positions = rows
        rotations = {t: (r.cos[positions].unsqueeze(1), r.signed_sin[positions].unsqueeze(1)) for t, r in ropes.items()}
        decode_masks = chunk_masks = {}
        if decode_keys is not None:
            decode_masks = {w: _visible(decode_keys, positions[:b, None], w)[:, None, None] for w in windows}
        if chunk_keys is not None:
            chunk_masks = {w: _visible(chunk_keys, positions[b:, None], w)[None, None] for w in windows}
        return cls(ids, at, positions, rotations, decode_masks, chunk_masks, chunk_slot)


def device_step(
    device: torch.device,
    token_ids: list[int],
    slots: np.ndarray,
    rows: np.ndarray,
    b: int,
    ropes: dict[float, Rope],
    windows: set[int],
) -> DeviceStep:
    """A step as it comes: the rows' tokens, `slots` and `rows` (step_rows'; decode rows first, b of them), the
    decode rows attending over the positions up to the furthest one's, the chunk's over its own."""
    on_device = torch.from_numpy(np.stack([token_ids, slots, rows])).to(device)
    decode_keys = torch.arange(int(rows[:b].max()) + 1, device=device) if b else None
    chunk_keys = torch.arange(int(rows[-1]) + 1, device=device) if len(rows) > b else None
    return DeviceStep.of(on_device, b, decode_keys, chunk_keys, ropes, windows, int(slots[-1]))


MIN_LENGTH = 256  # the shortest cache length a graph attends over: fewer graphs, and short ones cost little more


def powers_of_two(first: int, last: int) -> list[int]:
    """first, the powers of two between, and last (first a power of two, or last)."""
    return sorted({min(first << k, last) for k in range(max(last // first, 1).bit_length() + 1)})


Forward = Callable[[DeviceStep, int], torch.Tensor]  # a step's float32 logits (N, vocab) on the device


class DecodeGraphs:
    """Decode steps as CUDA graphs, one a batch size (powers of two up to the slots) and cache length (powers of
    two from MIN_LENGTH up to the context), captured by capture_all (else on first use): a small model's step
    is hundreds of small kernels, bound by launching them one by one, which a graph's replay launches at once.

    A graph's shapes and memory are fixed when it is captured: its rows are read from one buffer (tokens, slots,
    positions) that each step fills with one copy, they attend over the cache's first `length` positions under
    their masks, and the rows past a step's own (up to the graph's size) write to a scratch slot past the
    engine's (the cache holds slots + 1) and are dropped. Elsewhere than on CUDA the same fixed-shape step runs
    as it is, uncaptured.
    """

    def __init__(
        self,
        forward: Forward,
        device: torch.device,
        slots: int,
        context_length: int,
        ropes: dict[float, Rope],
        windows: set[int],
    ) -> None:
        self.forward, self.device, self.scratch = forward, device, slots
        self.sizes = powers_of_two(1, slots)
        self.lengths = powers_of_two(min(MIN_LENGTH, context_length), context_length)
        self.rows = torch.zeros(3, slots, dtype=torch.int64, device=device)  # tokens, slots, positions
        cuda = device.type == "cuda"
        self.host = torch.zeros(3, slots, dtype=torch.int64, pin_memory=cuda)  # pinned: copied without a wait
        self.keys = torch.arange(context_length, device=device)
        self.ropes, self.windows = ropes, windows
        self.graphs: dict[tuple[int, int], CUDAGraph] = {}  # by (size, length)
        self.pool: _POOL_HANDLE | None = None  # the graphs' memory, shared: one runs at a time
        self.logits: torch.Tensor | None = None  # (slots, vocab): every graph's result, copied there

    def capture_all(self) -> None:
        """Every graph, before the first step asks for one (a capture costs about a step; the first requests
        should not pay it), the largest first: the smaller ones' memory then comes from what it freed."""
        started = time.perf_counter()
        with torch.inference_mode():
            for size in reversed(self.sizes):
                for length in reversed(self.lengths):
                    self.graphs[size, length] = self._capture(size, length)
        log.info("captured %d decode graphs in %.1f s", len(self.graphs), time.perf_counter() - started)

    def decode(self, token_ids: list[int], positions: np.ndarray) -> torch.Tensor:
        """Float32 logits (B, vocab) on the device of decode rows in slots 0..B-1."""
        b, furthest = len(token_ids), int(positions.max())
        size, length = next(s for s in self.sizes if s >= b), next(n for n in self.lengths if n > furthest)
        if self.device.type == "cuda" and (size, length) not in self.graphs:
            self.graphs[size, length] = self._capture(size, length)
        host = self.host.numpy()  # the last step's copy has finished: its logits were read
        host[0, :size], host[1, :size], host[2, :size] = 0, self.scratch, 0
        host[0, :b], host[1, :b], host[2, :b] = token_ids, np.arange(b), positions
        self.rows[:, :size].copy_(self.host[:, :size], non_blocking=True)
        if self.device.type != "cuda":
            return self._step(size, length)[:b]
        self.graphs[size, length].replay()
        assert self.logits is not None
        return self.logits[:b]

    def _step(self, size: int, length: int) -> torch.Tensor:
        step = DeviceStep.of(self.rows[:, :size], size, self.keys[:length], None, self.ropes, self.windows)
        return self.forward(step, size)

    def _capture(self, size: int, length: int) -> CUDAGraph:
        """A graph of the step of `size` rows over `length` positions; its run first outside the capture makes
        the libraries' lazy set-up (handles, workspaces) happen there. Both runs write to the scratch slot only.
        Its logits are copied to one buffer all graphs share: a graph's own would stay allocated (Gemma's 262k
        vocabulary over 28 graphs: ~0.5 GB)."""
        self.rows[0, :size], self.rows[1, :size], self.rows[2, :size] = 0, self.scratch, 0
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            vocab = self._step(size, length).shape[-1]
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.logits is None:
            self.logits = torch.empty(self.rows.shape[1], vocab, dtype=torch.float32, device=self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:size].copy_(self._step(size, length))
        self.pool = graph.pool()
        return graph
