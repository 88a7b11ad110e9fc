"""The one thread of a process on which every model is loaded and runs its forward passes.

OpenMP, which runs numba's parallel kernels (and torch's CPU ops), keeps a team of worker threads for each
thread that starts parallel work, for as long as that thread lives. Once a process's teams hold more threads
than it has cores, libgomp has every team's workers stop spinning between parallel regions and sleep, so each of
the hundreds of regions of a decode step waits for its workers to be woken. With a thread per model that
happened as soon as a second model was loaded: on a 2-core machine a served SmolLM2 stream fell from ~110 to
~45 tokens/s once Gemma had answered one request (and a step driven from a second thread after the first ran
3-4x slower). One thread for every model's compute keeps one team; models' steps take turns on it, as they
would share the cores anyway. The engines' own threads keep the rest (admission, sampling, delivery). MLX
models stay on their engine's thread: MLX uses no OpenMP and keeps its streams per thread.

A model's load runs here too (its weights packed by torch on a first start, its first forward pass loading
the kernels), so it holds up the other models' steps while it lasts: ~1 s from packed weights, longer on a
model's first start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_marked = threading.local()


def _mark() -> None:
    _marked.compute = True


_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnserve-compute", initializer=_mark)


def on_compute_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(*args, **kwargs) run on the compute thread (directly when called there), its result or its exception."""
    if getattr(_marked, "compute", False):
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


def on_calling_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(*args, **kwargs) where it is called: for backends without OpenMP (MLX keeps its streams per thread)."""
    return fn(*args, **kwargs)
