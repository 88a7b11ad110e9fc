"""The kernels' compiled code: listed and compiled for another CPU (an image's build, `fnserve prepare
--kernels-for`), and an image's prebuilt copy seeded into numba's cache at start."""

from __future__ import annotations

import importlib
import logging
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import numba
from numba.core.dispatcher import Dispatcher

log = logging.getLogger(__name__)


KERNEL_MODULES = ("attention", "rows", "matmul")  # the modules of shared.backends.kernels that hold kernels
KernelKey = str | tuple[int, int, bool]  # a kernel by "module:name", or attention's by its arguments


def compiled_signatures() -> list[tuple[KernelKey, list[Any]]]:
    """The kernels this process has compiled (or loaded from numba's cache), each with its argument types: what
    compile_signatures compiles again in a process whose numba compiles for another CPU."""
    kernels: list[tuple[KernelKey, Any]] = []
    for name in KERNEL_MODULES:
        module = sys.modules.get(f"{__package__}.{name}")  # one this process never imported compiled nothing
        if module is not None:
            kernels += [
                (f"{name}:{key}", kernel) for key, kernel in vars(module).items() if isinstance(kernel, Dispatcher)
            ]
    attention = sys.modules.get(f"{__package__}.attention")
    if attention is not None:
        kernels += attention.made_kernels().items()
    return [(key, list(kernel.signatures)) for key, kernel in kernels if kernel.signatures]


def compile_signatures(entries: list[tuple[KernelKey, list[Any]]]) -> None:
    """Compile the kernels compiled_signatures listed (in another process) for the CPU this process's numba
    compiles for, into its cache, without running them: that CPU may have instructions this one lacks (an
    image's build compiling for hosts with AVX-512, see shared.backends.targets)."""
    from shared.backends.kernels.attention import attention

    for key, signatures in entries:
        if isinstance(key, tuple):
            kernel: Any = attention(*key)
        else:
            module, name = key.split(":")
            kernel = getattr(importlib.import_module(f"{__package__}.{module}"), name)
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
