"""The CPUs numba's kernels are compiled for ahead of time, and the choice among them at start.

numba finds a cached kernel only for the CPU it was compiled for (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES), so an
image compiles its kernels at build time for a CPU every host runs (its baseline, `x86-64-v3`). Where its build
also compiles them for a better target (`fnserve prepare --kernels-for x86-64-v4+avx512vnni`: 512-bit integer
dot products), it lists both in the kernels folder (MANIFEST), and each start takes the best listed target its
own CPU runs, before numba is imported: numba reads its CPU from the environment once, at its import.

A target is an x86-64 microarchitecture level (the psABI's: its features are fixed by definition) and features
on top, e.g. `x86-64-v4+avx512vnni`; a host runs it when it has every one of those features. This module imports
no numba.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.errors import BackendUnavailableError

log = logging.getLogger(__name__)

KERNELS_DIR = "kernels"  # the folder of the cache dir (FNSERVE_CACHE_DIR) an image's build compiles kernels into
MANIFEST = "targets.json"  # in that folder: the targets its kernels were compiled for
_FORMAT = 1

# The x86-64 psABI's microarchitecture levels, in LLVM's feature names (each level includes the one before).
_V1 = ("cmov", "cx8", "fxsr", "mmx", "sse", "sse2")
_V2 = (*_V1, "cx16", "sahf", "crc32", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3")
_V3 = (*_V2, "avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave")
_V4 = (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
LEVELS: dict[str, tuple[str, ...]] = {"x86-64": _V1, "x86-64-v2": _V2, "x86-64-v3": _V3, "x86-64-v4": _V4}


class TargetError(ValueError):
    """A target that is not an x86-64 level with features."""


@dataclass(frozen=True)
class Target:
    """A CPU numba compiles for: `cpu` (NUMBA_CPU_NAME) and `features` (NUMBA_CPU_FEATURES, "+name,..." or "")."""

    cpu: str
    features: str = ""

    @classmethod
    def parse(cls, name: str) -> Target:
        """`x86-64-v4+avx512vnni` (a level, then +feature for each feature on top of it)."""
        cpu, *extra = name.strip().split("+")
        if cpu not in LEVELS or not all(extra):
            raise TargetError(
                f"kernel target {name!r}: expected an x86-64 level ({', '.join(LEVELS)}) and +features, "
                "e.g. x86-64-v4+avx512vnni"
            )
        return cls(cpu, ",".join(f"+{f}" for f in extra))

    @classmethod
    def from_environment(cls) -> Target | None:
        """The CPU numba compiles for as the environment names it, or None for the host (NUMBA_CPU_NAME unset)."""
        cpu = os.environ.get("NUMBA_CPU_NAME")
        return cls(cpu, os.environ.get("NUMBA_CPU_FEATURES", "")) if cpu else None

    @property
    def name(self) -> str:
        extra = [f[1:] for f in self.features.split(",") if f.startswith("+")]
        return "+".join([self.cpu, *extra])

    def requires(self) -> list[str]:
        """The CPU features code compiled for this target may use (a level's and those added to it)."""
        if self.cpu not in LEVELS or any(f and not f.startswith("+") for f in self.features.split(",")):
            raise TargetError(f"kernel target {self.name!r}: its features are not known")
        return [*LEVELS[self.cpu], *(f[1:] for f in self.features.split(",") if f)]

    def environment(self) -> dict[str, str]:
        return {"NUMBA_CPU_NAME": self.cpu, "NUMBA_CPU_FEATURES": self.features}


def host_features() -> dict[str, bool]:
    """This host's CPU features, LLVM's names (llvmlite, which numba brings; its import is numba's first step)."""
    from llvmlite import binding

    return dict(binding.get_host_cpu_features())


def write_manifest(folder: Path, baseline: Target, targets: list[Target]) -> None:
    """Record, beside the kernels in folder, the baseline (what the environment names at start) and the targets
    compiled too, best first, with the features each needs."""
    entries = [{"name": t.name, **t.environment(), "requires": t.requires()} for t in targets]
    content = {"format": _FORMAT, "baseline": baseline.environment(), "targets": entries}
    path = folder / MANIFEST
    path.write_text(json.dumps(content, indent=1) + "\n")
    path.chmod(0o644)  # an image's build runs as root, its starts as another user


def _read_manifest(folder: Path) -> tuple[Target, list[tuple[Target, list[str]]]] | None:
    """The baseline and the other targets, each with the features it needs, or None (none listed, or unreadable)."""
    path = folder / MANIFEST
    try:
        content = json.loads(path.read_text())
        if content.get("format") != _FORMAT:
            raise ValueError(f"format {content.get('format')!r}, not {_FORMAT}")
        baseline = _listed(content["baseline"])
        targets = [(_listed(t), [str(f) for f in t["requires"]]) for t in content["targets"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("prebuilt kernels: cannot read %s (%s); numba compiles for the environment's CPU", path, exc)
        return None
    return baseline, targets


def _listed(entry: dict[str, str]) -> Target:
    return Target(str(entry["NUMBA_CPU_NAME"]), str(entry["NUMBA_CPU_FEATURES"]))


def choose(prebuilt: Path, wanted: str = "auto") -> Target | None:
    """Before numba is imported, point it at the best target whose kernels were compiled into `prebuilt` and
    this host runs (wanted "auto"), or at the one named (wanted: a target's name, e.g. "x86-64-v3": the same
    kernels on every host). Returns the target numba compiles for where one of the list is, else None: no list,
    an environment that names another CPU than the list's baseline (the user's own choice), or numba imported
    already. A name that is not listed, or whose features this host lacks, is an error."""
    manifest = _read_manifest(prebuilt)
    if manifest is None:
        if wanted != "auto":
            raise BackendUnavailableError(f"kernel_cpu {wanted!r}: no list of prebuilt kernels ({prebuilt / MANIFEST})")
        return None
    baseline, targets = manifest
    current = Target.from_environment()
    if wanted in ("auto", current and current.name) and current in [t for t, _ in targets]:
        return current  # chosen by an earlier load in this process
    if current != baseline:
        if wanted != "auto":
            raise BackendUnavailableError(
                f"kernel_cpu {wanted!r}: NUMBA_CPU_NAME names another CPU than {baseline.name}"
            )
        log.info("kernels: numba compiles for NUMBA_CPU_NAME as set, not the prebuilt kernels' CPUs")
        return None
    if wanted != "auto":
        names = [baseline.name, *(t.name for t, _ in targets)]
        if wanted not in names:
            raise BackendUnavailableError(f"kernel_cpu {wanted!r}: the prebuilt kernels are for {', '.join(names)}")
        targets = [(t, needs) for t, needs in targets if t.name == wanted]
    features = host_features()
    for target, needs in targets:
        if missing := [f for f in needs if not features.get(f)]:
            if wanted != "auto":
                raise BackendUnavailableError(f"kernel_cpu {wanted!r}: this CPU lacks {', '.join(missing)}")
            continue
        if "numba" in sys.modules:  # it read its CPU at its import
            log.warning("kernels: numba was imported before its CPU was chosen; they run as %s", baseline.name)
            return None
        os.environ.update(target.environment())
        log.info("kernels: compiled for %s, which this CPU runs", target.name)
        return target
    return baseline
