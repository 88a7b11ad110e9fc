"""The batched runner's CPU int4 weights kept as the kernels read them, so a start maps them instead of packing.

See PackedWeights; docs/engine.md ("Packed weights are kept") and docs/benchmarks.md (what it saves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.backends.kernels.isa import dot_kernels, int4_dot_supported
from shared.backends.llama_config import Kind, Layer, Weights
from shared.settings import Quantization

if TYPE_CHECKING:
    import torch

    from shared.backends.cpu_runner import CpuWeights

log = logging.getLogger(__name__)

PACK_FORMAT = 10  # the layout of PackedWeights' files, or their keys; a change that alters either bumps this
# (so that files of the former, which no start reads again, are pruned: see _prune)
# safetensors' element types as numpy reads them; bfloat16 as its bits (the kernels read them so)
_ELEMENTS = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "F16": np.float16, "BF16": np.int16, "F32": np.float32}
UNUSED_FOR = 7 * 24 * 3600  # seconds; another format's or torch's file is removed after this long unread


class PackedWeights:
    """A runner's CPU int4 weights as the kernels read them (packed 4-bit layers, the 8-bit head and embedding),
    saved once: a later start maps the file instead of reading the float32 checkpoint, checking it for `auto` and
    packing it again (~1 s of a 2-core cold start). The name keys everything the packing depends on: the
    checkpoint's content and config, the quantization asked for, and whether numba's kernels read them (AVX2's
    and AVX-512's read the same planes); for torch's int4pack kernel (a CPU without numba's dot kernels, or int4
    without AVX-512 BF16) also torch's version and its CPU kernels' ISA.
    When `auto` finds a checkpoint that is not 4-bit, the file is an empty marker, so that check runs once too.
    Weights of the numba kernels come back as numpy arrays without importing torch (`arrays`); torch's, and
    the packing, import it (`load`, `save`).
    """

    def __init__(self, directory: Path, model_dir: Path, quantization: Quantization, dtype: str) -> None:
        """dtype: the name of the dense weights' dtype (float32, bfloat16)."""
        from shared.sources import fingerprint

        numba_planes = dot_kernels() is not None  # AVX2's and AVX-512's kernels read the same planes
        facts: list[Any] = [
            PACK_FORMAT,
            numba_planes,  # whose layout the planes take (see Linear)
            quantization,
            dtype,
            (model_dir / "config.json").read_text(),
            fingerprint(model_dir / "model.safetensors"),
        ]
        made_by = f"{PACK_FORMAT} numba"
        if not numba_planes or (quantization == "int4" and not int4_dot_supported()):  # torch's int4pack layout:
            import torch  # its version and ISA decide

            facts += [torch.__version__, torch.backends.cpu.get_cpu_capability()]
            made_by = f"{PACK_FORMAT} torch {torch.__version__}"
        key = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]
        self._stem = f"{model_dir.name}-{quantization}"
        self._made_by = made_by  # what a file's readers must match
        self.path = directory / f"{self._stem}-{key}.safetensors"

    def quantization(self) -> Quantization | None:
        """What the saved weights were prepared for, or None when nothing (readable) is saved."""
        try:
            saved: Any = _header(self.path)[1].get("quantization")
            return saved if saved in ("int4", "int4-a8", "none") else None
        except FileNotFoundError:
            return None
        except Exception as exc:  # a truncated or foreign file: packed again, and written anew
            log.warning("ignoring the packed weights in %s: %s", self.path, exc)
            return None

    def arrays(self) -> CpuWeights | None:
        """The saved weights as numpy arrays mapped from the file, for the CPU runner, without torch: None when
        nothing (readable) is saved or some projection is one of torch's kernels (then `load`)."""
        from shared.backends.cpu_runner import ByteEmbedding, DotLinear  # that module imports this one

        try:
            if (found := _read(self.path)) is None:
                return None
            meta, tensors = found
            kinds: dict[str, Kind] = json.loads(meta["kinds"])
            parts = _parts(tensors)
            dot = {"quads0", "bytes0", "nibbles0"}  # the numba kernels' planes (see Linear.state)
            if meta.get("quantization") not in ("int4", "int4-a8") or any(not dot & set(parts[n]) for n in kinds):
                return None  # torch's int4pack planes or dense weights (or nothing): torch reads them

            def linear(name: str) -> DotLinear:
                tensors = parts[name]
                values = next(n for n in ("quads", "bytes", "nibbles") if f"{n}0" in tensors)
                sz = [tensors[f"sz{j}"] for j in range(len(tensors) // 2)]  # float16's and bfloat16's as int16 bits
                planes = [
                    (tensors[f"{values}{j}"], s.view(np.int16) if s.dtype == np.float16 else s)
                    for j, s in enumerate(sz)
                ]
                return DotLinear(kinds[name], planes, 16 * sz[0].shape[0])  # every dot kernel's scales: (N/16, ...)

            embed = ByteEmbedding(parts["embed"]["q"], parts["embed"]["d"])
            weights: CpuWeights = _assemble(meta, parts, kinds, linear, embed)
        except Exception as exc:
            log.warning("ignoring the packed weights in %s: %s", self.path, exc)
            return None
        self._used()
        return weights

    def load(self, dtype: torch.dtype) -> Weights[Any, Any, Any] | None:
        """The saved weights as torch tensors mapped from the file (zero-copy), or None when they cannot be read."""
        import torch
        from safetensors import safe_open

        from shared.backends.projections import Embedding, Linear  # torch: imported only where packing needs it

        try:
            with safe_open(self.path, "pt") as f:  # the tensors map the file, as safetensors' load_file does
                meta = f.metadata()
                tensors = f.get_tensors()
            kinds: dict[str, Kind] = json.loads(meta["kinds"])
            parts = _parts(tensors)
            embed = Embedding(torch.empty(0), dtype, (parts["embed"]["q"], parts["embed"]["d"]))
            weights = _assemble(meta, parts, kinds, lambda name: Linear.restore(kinds[name], dtype, parts[name]), embed)
        except Exception as exc:
            log.warning("ignoring the packed weights in %s: %s", self.path, exc)
            return None
        self._used()
        return weights

    def _used(self) -> None:
        log.info("loaded packed weights from %s", self.path)
        try:
            os.utime(self.path)  # in use: another torch's writes must not prune it (see _prune)
        except OSError:  # a read-only cache (an image's): nothing prunes it either
            pass

    def save(self, weights: Weights[Any, Any, Any]) -> None:
        """Write the weights (atomically; a failure to write only costs the next start the packing)."""
        import torch
        from safetensors.torch import save_file

        from shared.backends.projections import Linear

        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, Kind] = {}
        if weights.quantization != "none":
            tensors.update({"embed/q": weights.embed.q, "embed/d": weights.embed.d, "norm/": weights.norm})
            named: list[tuple[str, Any]] = [("lm_head", weights.lm_head)]
            for i, layer in enumerate(weights.layers):
                named += [(f"layers.{i}.{f.name}", getattr(layer, f.name)) for f in fields(Layer)]
            for name, value in named:
                if isinstance(value, Linear):
                    kinds[name] = value.quantization
                    tensors.update({f"{name}/{part}": t for part, t in value.state().items()})
                elif isinstance(value, torch.Tensor):
                    tensors[f"{name}/"] = value
                elif value is not None:
                    raise TypeError(f"{name}: {type(value).__name__} weights are not saved")
        meta = {
            "quantization": weights.quantization,
            "kinds": json.dumps(kinds),
            "layers": str(len(weights.layers)),
            "made_by": self._made_by,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}-", dir=self.path.parent)
            os.close(fd)
            try:
                save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=meta)
                os.chmod(tmp, 0o644)  # an image's non-root user reads what its build wrote
                os.replace(tmp, self.path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not keep the packed weights in %s: %s", self.path, exc)
            return
        self._prune()

    def _prune(self) -> None:
        """Remove this model's files that another torch or file format made and no start has read for
        UNUSED_FOR: an upgrade leaves its predecessor's file behind (130 MB for SmolLM2), while two installs with
        different torch versions may share one cache and each read its own. Files of other settings (another
        dtype, quantization or model) stay."""
        for other in self.path.parent.glob(f"{self._stem}-*.safetensors"):
            if other == self.path:
                continue
            try:
                made_by = _header(other)[1].get("made_by")
                if made_by != self._made_by and time.time() - other.stat().st_mtime > UNUSED_FOR:
                    other.unlink()
                    log.info("removed packed weights another version made, unused for a week: %s", other)
            except Exception:  # unreadable (damaged): left alone
                continue


def _header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """A safetensors file's tensors (name: dtype, shape, data_offsets), its metadata, and where its data starts:
    the format is an 8-byte header size, a JSON header of offsets, then the data."""
    with path.open("rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return header, header.pop("__metadata__", {}), 8 + size


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]] | None:
    """A safetensors file's metadata and tensors as numpy arrays that map it, or None when there is no file.
    safetensors' own numpy loader copies each tensor (0.1 s and the weights' size in memory here). The mapping is
    private, as torch's of the same file: the arrays are writable (numba compiles read-only arrays' kernels apart)
    and the file unchanged."""
    try:
        header, meta, start = _header(path)
        with path.open("rb") as f:
            pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        return None
    data = memoryview(pages)[start:]
    tensors = {
        name: np.frombuffer(data[t["data_offsets"][0] : t["data_offsets"][1]], _ELEMENTS[t["dtype"]]).reshape(
            t["shape"]
        )
        for name, t in header.items()
    }
    return meta, tensors


def _parts(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Saved tensors by owner: {"layers.0.qkv": {"nibbles0": ..., "sz0": ...}, "norm": {"": ...}, ...}."""
    parts: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        owner, _, part = name.partition("/")
        parts.setdefault(owner, {})[part] = t
    return parts


def _assemble(
    meta: dict[str, str],
    parts: dict[str, dict[str, Any]],
    kinds: dict[str, Kind],
    linear: Callable[[str], Any],
    embed: Any,
) -> Weights[Any, Any, Any]:
    """The runner's weights from the saved parts: projections (those in kinds) made by `linear`, arrays as saved."""

    def item(name: str) -> Any:
        return linear(name) if name in kinds else parts[name][""]

    names = [f.name for f in fields(Layer)]
    layers = [
        Layer(**{n: item(f"layers.{i}.{n}") for n in names if f"layers.{i}.{n}" in parts})
        for i in range(int(meta["layers"]))
    ]
    return Weights(meta["quantization"], embed, item("lm_head"), item("norm"), layers)  # type: ignore[arg-type]
