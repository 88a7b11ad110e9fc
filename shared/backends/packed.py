"""The batched runner's CPU int4 weights kept as the kernels read them, so a start maps them instead of packing.

See PackedWeights; docs/engine.md ("Packed weights are kept") and docs/benchmarks.md (what it saves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.backends.kernels import int4_dot_supported
from shared.settings import Quantization

if TYPE_CHECKING:
    from shared.backends.llama import Kind, Weights

log = logging.getLogger(__name__)

PACK_FORMAT = 4  # the layout of PackedWeights' files; a change that alters it bumps this
UNUSED_FOR = 7 * 24 * 3600  # seconds; another format's or torch's file is removed after this long unread


class PackedWeights:
    """A runner's CPU int4 weights as the kernels read them (packed 4-bit layers, the 8-bit head and embedding),
    saved once: a later start maps the file instead of reading the float32 checkpoint, checking it for `auto` and
    packing it again (~1 s of a 2-core cold start). The name keys everything the packing depends on: the
    checkpoint's content and config, the quantization asked for, torch's version and its CPU kernels' ISA, and
    which int4 kernel reads them.
    When `auto` finds a checkpoint that is not 4-bit, the file is an empty marker, so that check runs once too.
    """

    def __init__(self, directory: Path, model_dir: Path, quantization: Quantization, dtype: torch.dtype) -> None:
        from shared.sources import fingerprint

        facts = [
            PACK_FORMAT,
            torch.__version__,
            torch.backends.cpu.get_cpu_capability(),
            int4_dot_supported(),  # whose layout the int4 planes take (see Linear)
            quantization,
            str(dtype),
            (model_dir / "config.json").read_text(),
            fingerprint(model_dir / "model.safetensors"),
        ]
        key = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]
        self._stem = f"{model_dir.name}-{quantization}"
        self._made_by = f"{PACK_FORMAT} torch {torch.__version__}"  # what a file's readers must match
        self.path = directory / f"{self._stem}-{key}.safetensors"

    def quantization(self) -> Quantization | None:
        """What the saved weights were prepared for, or None when nothing (readable) is saved."""
        try:
            with safe_open(self.path, "pt") as f:
                saved = (f.metadata() or {}).get("quantization")
            return saved if saved in ("int4", "int4-a8", "none") else None
        except FileNotFoundError:
            return None
        except Exception as exc:  # a truncated or foreign file: packed again, and written anew
            log.warning("ignoring the packed weights in %s: %s", self.path, exc)
            return None

    def load(self, dtype: torch.dtype, quantization: Quantization) -> Weights | None:
        """The saved weights, mapped from the file (zero-copy), or None when they cannot be read."""
        from shared.backends.llama import Embedding, Layer, Linear, Weights  # that module imports this one

        try:
            with safe_open(self.path, "pt") as f:  # the tensors map the file, as safetensors' load_file does
                meta = f.metadata()
                tensors = f.get_tensors()
            kinds: dict[str, Kind] = json.loads(meta["kinds"])
            parts: dict[str, dict[str, torch.Tensor]] = {}
            for name, t in tensors.items():
                owner, _, part = name.partition("/")
                parts.setdefault(owner, {})[part] = t

            def item(name: str) -> Any:
                return Linear.restore(kinds[name], dtype, parts[name]) if name in kinds else parts[name][""]

            names = [f.name for f in fields(Layer)]
            layers = [
                Layer(**{n: item(f"layers.{i}.{n}") for n in names if f"layers.{i}.{n}" in parts})
                for i in range(int(meta["layers"]))
            ]
            embed = Embedding(torch.empty(0), dtype, (parts["embed"]["q"], parts["embed"]["d"]))
            weights = Weights(quantization, embed, item("lm_head"), item("norm"), layers)
        except Exception as exc:
            log.warning("ignoring the packed weights in %s: %s", self.path, exc)
            return None
        log.info("loaded packed weights from %s", self.path)
        try:
            os.utime(self.path)  # in use: another torch's writes must not prune it (see _prune)
        except OSError:  # a read-only cache (an image's): nothing prunes it either
            pass
        return weights

    def save(self, weights: Weights) -> None:
        """Write the weights (atomically; a failure to write only costs the next start the packing)."""
        from shared.backends.llama import Layer, Linear

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
                with safe_open(other, "pt") as f:
                    made_by = (f.metadata() or {}).get("made_by")
                if made_by != self._made_by and time.time() - other.stat().st_mtime > UNUSED_FOR:
                    other.unlink()
                    log.info("removed packed weights another version made, unused for a week: %s", other)
            except Exception:  # unreadable (damaged): left alone
                continue
