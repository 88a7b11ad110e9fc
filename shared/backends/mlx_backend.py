"""MLX backend (mlx-lm): Apple Silicon's GPU, or mlx[cpu] on Linux (slow, but the same numerics path).

Models whose mlx-lm cache is a plain KV cache in every layer (Llama, Qwen, Mistral without a rotating window)
run batched: decode rows go through mlx-lm's own `BatchKVCache` (right-aligned rows with per-row left padding,
the layout its `BatchGenerator` uses) and prompt chunks through a sequence's own `KVCache`. So does Gemma 3,
whose sliding layers mask their window themselves: there those layers keep every position in a plain cache
(more memory than mlx-lm's rotating cache of the window, the same attention). Other models with rotating caches
step each sequence in turn.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _openblas_first() -> None:
    """mlx[cpu]'s Linux wheel links the reference BLAS: a float32 matmul ran at 2.5 GFLOP/s on 2 cores. An
    installed OpenBLAS (Debian's libopenblas0), loaded into the global scope before MLX is, serves MLX's
    `cblas_sgemm` instead: 61 GFLOP/s for a 28-row prompt through Gemma 3's output head, 2-3x for a decode row.
    MLX alone calls BLAS by those names here; torch, numpy and onnxruntime bring their own."""
    if sys.platform != "linux" or "mlx.core" in sys.modules:
        return
    name = ctypes.util.find_library("openblas")
    if name is not None:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # the reference BLAS then: slower, as correct


_openblas_first()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import BatchKVCache, KVCache, RotatingKVCache, make_prompt_cache  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from shared.backends import BatchSteps, Chunk  # noqa: E402
from shared.settings import Settings  # noqa: E402

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}

# mlx-lm models whose sliding-window layers build their masks with the window (`window_size`), so a plain cache
# of every position attends as their rotating cache of the window does.
WINDOW_MASKED = frozenset({"gemma3_text", "gemma3"})

# One sequence's cache: (keys, values) of each layer, each (1, kv heads, positions, head dim).
Content = list[tuple[mx.array, mx.array]]


class MLXRunner:
    """Per-sequence steps: one mlx-lm prompt cache for each sequence."""

    def __init__(self, model: Any, context_length: int) -> None:
        self.model = model
        self.context_length = context_length

    def new_cache(self) -> list[Any]:
        return make_prompt_cache(self.model)

    def forward(self, cache: list[Any], token_ids: Sequence[int]) -> np.ndarray:
        logits = last_logits(self.model, mx.array([list(token_ids)]), cache)[0]  # (vocab,)
        return np.array(logits.astype(mx.float32))


def last_logits(model: Any, inputs: mx.array, cache: list[Any]) -> mx.array:
    """The logits of the last position of each row, (rows, vocab), as mlx-lm's own generation takes them: the
    positions before it go through the model first, and their logits, never asked for, are never computed
    (MLX evaluates only what is used). A slice of the whole call's logits would compute them all first: the
    output head over Gemma 3's 262,144 tokens was two thirds of a 28-token prompt's time."""
    if inputs.shape[1] > 1:
        model(inputs[:, :-1], cache=cache)
        inputs = inputs[:, -1:]
    return model(inputs, cache=cache)[:, -1]


class _Rows:
    """The decode batch's cache: per layer (R, kv heads, capacity, head dim) keys and values, each row's
    positions right-aligned to end at `end`, row r's starting at pad[r] (the left padding masked out)."""

    def __init__(self, layers: int) -> None:
        self.keys: list[mx.array | None] = [None] * layers
        self.values: list[mx.array | None] = [None] * layers
        self.pad: list[int] = []
        self.end = 0

    def length(self, row: int) -> int:
        return self.end - self.pad[row]

    def content(self, row: int, length: int) -> Content:
        start = self.pad[row]
        return [
            (k[row : row + 1, :, start : start + length], v[row : row + 1, :, start : start + length])
            for k, v in zip(self.keys, self.values, strict=True)
            if k is not None and v is not None
        ]

    def resize(self, rows: int) -> None:
        """Keep the first `rows` rows; new rows are empty."""
        have = len(self.pad)
        if rows < have:
            self.keys = [k[:rows] if k is not None else None for k in self.keys]
            self.values = [v[:rows] if v is not None else None for v in self.values]
            self.pad = self.pad[:rows]
        elif rows > have:
            self.keys = [_grow_rows(k, rows) for k in self.keys]
            self.values = [_grow_rows(v, rows) for v in self.values]
            self.pad += [self.end] * (rows - have)
        if self.pad and (drop := min(self.pad)) > 0:  # positions every row pads: gone
            self.keys = [k[:, :, drop:] if k is not None else None for k in self.keys]
            self.values = [v[:, :, drop:] if v is not None else None for v in self.values]
            self.pad = [p - drop for p in self.pad]
            self.end -= drop

    def put(self, row: int, content: Content) -> None:
        """Row `row` holds `content` now, right-aligned like the others (the rows shift right if it is longer)."""
        n = content[0][0].shape[2] if content else 0
        if n > self.end:  # every row moves right by the difference
            grow = n - self.end
            self.keys = [_pad_left(k, grow, self.end) if k is not None else None for k in self.keys]
            self.values = [_pad_left(v, grow, self.end) if v is not None else None for v in self.values]
            self.pad = [p + grow for p in self.pad]
            self.end = n
        rows = len(self.pad)
        for layer, (k, v) in enumerate(content):
            if self.keys[layer] is None:
                self.keys[layer] = mx.zeros((rows, k.shape[1], self.end, k.shape[3]), k.dtype)
                self.values[layer] = mx.zeros((rows, v.shape[1], self.end, v.shape[3]), v.dtype)
            keys, values = self.keys[layer], self.values[layer]
            assert keys is not None and values is not None
            keys[row : row + 1, :, self.end - n : self.end] = k
            values[row : row + 1, :, self.end - n : self.end] = v
        self.pad[row] = self.end - n

    def caches(self) -> list[BatchKVCache]:
        """mlx-lm's batch caches over these arrays, for one forward pass."""
        out = []
        for k, v in zip(self.keys, self.values, strict=True):
            cache = BatchKVCache(self.pad)
            # the offsets are each row's next position, for RoPE
            offsets = mx.array([self.end - p for p in self.pad])
            cache.state = (k, v, offsets, mx.array(self.pad), self.end if k is not None else 0)
            out.append(cache)
        return out

    def took(self, caches: list[BatchKVCache], n: int) -> None:
        """After a forward pass of n tokens a row: the caches' (possibly regrown) arrays."""
        self.keys = [c.keys for c in caches]
        self.values = [c.values for c in caches]
        self.end += n


def _grow_rows(a: mx.array | None, rows: int) -> mx.array | None:
    if a is None:
        return None
    return mx.concatenate([a, mx.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


def _pad_left(a: mx.array, n: int, end: int) -> mx.array:
    return mx.concatenate([mx.zeros((a.shape[0], a.shape[1], n, a.shape[3]), a.dtype), a[:, :, :end]], axis=2)


class MLXBatchRunner(BatchSteps):
    """Continuous batching on MLX, behind the engine's BatchRunner interface.

    A slot's cache lives in one place: a sequence's own prompt cache while its prompt runs in chunks (and for
    the prefix cache's slots), or its row of the decode batch. A decode step moves the rows it needs into the
    batch first, each cut to its position: a row the engine runs as a placeholder (its prompt still running)
    keeps only what its prompt wrote.
    """

    def __init__(self, model: Any, context_length: int, slots: int) -> None:
        self.model = model
        self.context_length = context_length
        self.slots = slots
        self._layers = len(make_prompt_cache(model))
        self._rows = _Rows(self._layers)
        self._own: dict[int, Content] = {}  # slots whose cache is not a decode row

    def step(
        self, token_ids: list[int], positions: list[int], chunk: Chunk | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        self._check(positions, chunk)
        chunk_logits = self._chunk(chunk) if chunk else None
        if not token_ids:
            return np.zeros((0, 0), np.float32), chunk_logits
        rows = self._rows
        for slot in range(len(token_ids), len(rows.pad)):  # rows past this step's: kept, off the batch
            if slot not in self._own:
                self._own[slot] = _copy(rows.content(slot, rows.length(slot)))
        rows.resize(len(token_ids))
        for slot, position in enumerate(positions):
            if slot in self._own:
                rows.put(slot, [(k[:, :, :position], v[:, :, :position]) for k, v in self._own.pop(slot)])
            elif rows.length(slot) != position:  # a placeholder's last entry: not part of its prompt
                rows.put(slot, _copy(rows.content(slot, position)))
        caches = rows.caches()
        logits = self.model(mx.array(token_ids)[:, None], cache=caches)[:, -1]
        rows.took(caches, 1)
        out = np.array(logits.astype(mx.float32))
        return out, chunk_logits

    def move_slot(self, src: int, dst: int, length: int, start: int = 0) -> None:
        self._own[dst] = _copy(self._content(src, length))  # whole: a slot's content is one array a layer

    def release_slot(self, slot: int) -> None:
        self._own.pop(slot, None)

    def _content(self, slot: int, length: int) -> Content:
        if slot in self._own:
            return [(k[:, :, :length], v[:, :, :length]) for k, v in self._own[slot]]
        if slot < len(self._rows.pad):
            return self._rows.content(slot, min(length, self._rows.length(slot)))
        return []

    def _chunk(self, chunk: Chunk) -> np.ndarray:
        caches = [KVCache() for _ in range(self._layers)]
        if chunk.start:
            for cache, (k, v) in zip(caches, self._content(chunk.slot, chunk.start), strict=True):
                cache.keys, cache.values, cache.offset = k, v, k.shape[2]
        logits = last_logits(self.model, mx.array([chunk.token_ids]), caches)[0]
        self._own[chunk.slot] = [(c.keys[:, :, : c.offset], c.values[:, :, : c.offset]) for c in caches]
        return np.array(logits.astype(mx.float32))


def _copy(content: Content) -> Content:
    """Its own arrays, evaluated: a later in-place write to the rows they came from leaves them as they are."""
    out = [(mx.contiguous(k), mx.contiguous(v)) for k, v in content]
    mx.eval(out)
    return out


class MLXBackend:
    name = "mlx"
    compute_thread = False  # no OpenMP; MLX keeps its streams per thread, so a model stays on its engine's thread

    def __init__(self, dtype: str, slots: int, engine: str, max_model_len: int | None = None) -> None:
        self.dtype = dtype
        self.slots = slots
        self.engine = engine
        self.max_model_len = max_model_len

    def load(self, model_dir: Path) -> MLXRunner | MLXBatchRunner:
        model, config = load_model(Path(model_dir))
        model.set_dtype(_DTYPES[self.dtype])
        context = int(config.get("max_position_embeddings", 2048))
        if self.engine == "batched" and batchable(model):
            # the batched engine's context, as on torch: 2048 unless max_model_len says otherwise
            return MLXBatchRunner(model, self.max_model_len or min(2048, context), self.slots)
        return MLXRunner(model, context)


def batchable(model: Any) -> bool:
    """Whether the batch runner's plain caches give this model's attention: every layer's mlx-lm cache is plain,
    or it is a rotating cache of a window the model also masks (and keeps no first positions)."""
    caches = make_prompt_cache(model)
    if all(type(c) is KVCache for c in caches):
        return True
    return getattr(model, "model_type", None) in WINDOW_MASKED and all(
        type(c) is KVCache or (type(c) is RotatingKVCache and c.keep == 0) for c in caches
    )


def create(name: str, settings: Settings) -> MLXBackend:
    """MLX in the dtype asked for; float32 by default, which matches torch CPU token for token."""
    return MLXBackend(
        "float32" if settings.dtype == "auto" else settings.dtype,
        settings.max_running + settings.prefix_cache_slots,
        settings.engine,
        settings.max_model_len,
    )
