"""Backend selection: an ordered registry (MLX on Apple Silicon, torch CUDA, torch CPU); first available wins.

Each backend module imports its framework at the top, and is itself imported only when that backend is checked
or chosen, so a function that needs no model imports no framework.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.errors import BackendUnavailableError
from shared.settings import Settings


class ModelRunner(Protocol):
    """A loaded causal language model that runs forward steps over a KV cache it owns."""

    context_length: int

    def new_cache(self) -> Any:
        """An empty KV cache for one sequence."""
        ...

    def forward(self, cache: Any, token_ids: Sequence[int]) -> np.ndarray:
        """Run token_ids after what the cache holds; return the last position's logits, (vocab,) float32."""
        ...


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of the sequence in `slot`, at positions start.."""

    slot: int
    token_ids: list[int]
    start: int


class BatchRunner(Protocol):
    """A model that steps many sequences together over a KV cache of fixed slots it owns.

    The engine keeps its running sequences in slots 0..n-1: `decode` runs slots 0..len(token_ids)-1.
    """

    context_length: int
    slots: int

    def step(
        self, token_ids: list[int], positions: list[int], chunk: Chunk | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """decode and prefill in one pass over the weights: (decode logits, the chunk's last logits or None)."""
        ...

    def prefill(self, slot: int, token_ids: list[int], start: int) -> np.ndarray:
        """Run token_ids of one sequence at positions start..; the last position's logits, (vocab,)."""
        ...

    def decode(self, token_ids: list[int], positions: list[int]) -> np.ndarray:
        """One token per slot 0..B-1 at the given positions; logits (B, vocab) float32."""
        ...

    def move_slot(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Copy cached positions start..length-1 of slot src to slot dst (whose first `start` are the same)."""
        ...

    def release_slot(self, slot: int) -> None:
        """Give back the memory a slot's cache holds, where it can be (its content is gone)."""
        ...


class BatchSteps:
    """A batched runner's step, prefill and decode, around its `_logits` (the runner's forward pass)."""

    context_length: int

    def prefill(self, slot: int, token_ids: list[int], start: int) -> np.ndarray:
        """Run token_ids for one sequence at positions start.. in its slot; the last position's logits."""
        logits = self.step([], [], Chunk(slot, token_ids, start))[1]
        assert logits is not None
        return logits

    def decode(self, token_ids: list[int], positions: list[int]) -> np.ndarray:
        """One token for each sequence in slots 0..B-1 at its position; logits (B, vocab) float32."""
        return self.step(token_ids, positions, None)[0]

    def step(
        self, token_ids: list[int], positions: list[int], chunk: Chunk | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A decode token for each of slots 0..B-1 and a prompt chunk of one slot, in one pass over the weights.

        Returns the decode rows' logits (B, vocab) and the chunk's last position's logits (vocab,), or None.
        A few decode rows read every weight anyway, so a chunk that rides along costs little more than the
        rows it adds (and with `mixed`, from 8 rows the whole step uses the faster int8 matmuls).
        """
        self._check(positions, chunk)
        b = len(token_ids)
        logits = self._logits(token_ids, np.asarray(positions, dtype=np.int64), chunk)
        return logits[:b], (logits[b] if chunk else None)

    def _check(self, positions: list[int], chunk: Chunk | None) -> None:
        if max(positions, default=0) >= self.context_length or (
            chunk and chunk.start + len(chunk.token_ids) > self.context_length
        ):
            raise ValueError(f"positions past the KV cache's {self.context_length}")

    def _logits(self, token_ids: list[int], positions: np.ndarray, chunk: Chunk | None) -> np.ndarray:
        """Float32 logits of the decode rows, then of the chunk's last position."""
        raise NotImplementedError


def step_rows(positions: np.ndarray, chunk: Chunk | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cache slot and position in a step: decode rows in slots 0..B-1 at their positions, then the
    chunk's tokens in its slot, at chunk.start onwards."""
    b, t = len(positions), len(chunk.token_ids) if chunk else 0
    slots = np.arange(b + t, dtype=np.int64)
    if not chunk:
        return slots, positions
    slots[b:] = chunk.slot
    return slots, np.concatenate([positions, np.arange(chunk.start, chunk.start + t, dtype=np.int64)])


class Backend(Protocol):
    name: str
    dtype: str
    # Whether its models' loads and steps belong on the process-wide compute thread: those of OpenMP's users
    # (torch, numba), whose teams slow each other down when more than one thread starts parallel work.
    compute_thread: bool

    def load(self, model_dir: Path) -> ModelRunner | BatchRunner:
        """Load a Hugging Face-format model directory (config.json + safetensors)."""
        ...


def _apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _mlx_missing(auto: bool) -> str | None:
    if auto and not _apple_silicon():
        return "MLX is chosen automatically only on Apple Silicon"
    if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
        return "mlx and mlx-lm are not installed (pip install 'fnserve[mlx]')"
    return None


def _torch_missing() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install torch, then 'fnserve[cpu]')"
    return None


def _cuda_missing(auto: bool) -> str | None:
    """Why CUDA cannot run here. What can be told without importing torch (~1.5 s, which a CPU start over packed
    weights never pays) is checked first: a CPU-only torch build, or a Linux machine with no NVIDIA device node."""
    if reason := _torch_missing():
        return reason
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a torch without its distribution's metadata: ask torch
        version = ""
    if version.endswith("+cpu"):
        return f"no CUDA device for torch {version}, a CPU-only build"
    if platform.system() == "Linux" and not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/dxg")):
        return "no CUDA device: no NVIDIA driver's device here (/dev/nvidiactl)"
    import torch

    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def _cpu_missing(auto: bool) -> str | None:
    return _torch_missing()


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str
    missing: Callable[[bool], str | None]  # why it cannot run here, or None


REGISTRY: tuple[BackendEntry, ...] = (
    BackendEntry("mlx", "shared.backends.mlx_backend", _mlx_missing),
    BackendEntry("cuda", "shared.backends.torch_backend", _cuda_missing),
    BackendEntry("cpu", "shared.backends.torch_backend", _cpu_missing),
)


def _build(entry: BackendEntry, settings: Settings, prebuilt_kernels: bool = True) -> Backend:
    if prebuilt_kernels and entry.module == "shared.backends.torch_backend":  # numba reads its CPU at its import
        from shared.backends.targets import KERNELS_DIR, choose

        choose(settings.cache_dir / KERNELS_DIR, settings.kernel_cpu)
    module = importlib.import_module(entry.module)
    backend: Backend = module.create(entry.name, settings)
    return backend


def select_backend(settings: Settings, prebuilt_kernels: bool = True) -> Backend:
    """The backend the settings name, or the first available one. A named backend that cannot run is an error.
    prebuilt_kernels: whether numba may take the best CPU an image's kernels were compiled for (not while they
    are being compiled for the environment's own: `fnserve prepare`)."""
    if settings.backend != "auto":
        entry = next(e for e in REGISTRY if e.name == settings.backend)
        if reason := entry.missing(False):
            raise BackendUnavailableError(f"backend {entry.name!r} was asked for, but {reason}")
        return _build(entry, settings, prebuilt_kernels)
    reasons = []
    for entry in REGISTRY:
        if (reason := entry.missing(True)) is None:
            return _build(entry, settings, prebuilt_kernels)
        reasons.append(f"{entry.name}: {reason}")
    raise BackendUnavailableError("no backend can run here: " + "; ".join(reasons))
