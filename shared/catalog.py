"""The model catalog: configured models, the `default` alias, lazy loading once per process."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Literal

from shared.backends import Backend, select_backend
from shared.errors import InvalidRequestError, ModelNotFoundError
from shared.settings import ModelConfig, Settings
from shared.sources import resolve_embedding_model, resolve_generation_model

if TYPE_CHECKING:  # both pull in heavy libraries; a function that serves no model must not pay for them
    from shared.embeddings import EmbeddingModel
    from shared.generation.model import GenerationModel

log = logging.getLogger(__name__)

Kind = Literal["generate", "embedding"]
CardKind = Literal["chat", "completion", "embedding"]

# What is known of the embedded models before they load: Gemma 3 270M is a base model, with no chat template.
_EMBEDDED_KINDS: dict[str, CardKind] = {"embedded:gemma-3-270m": "completion"}


class ModelCatalog:
    """What a process serves. Models load on first use (or at start for `preload`), then stay loaded."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self._backend = backend
        self._configs = {m.id: m for m in settings.served_models}
        self._generation: dict[str, GenerationModel] = {}
        self._embedding: dict[str, EmbeddingModel] = {}
        self._locks = {model_id: threading.Lock() for model_id in self._configs}
        self.load_seconds: dict[str, float] = {}  # each loaded model's load time
        self._backend_lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = select_backend(self.settings)
                log.info("backend: %s (%s)", self._backend.name, self._backend.dtype)
            return self._backend

    @property
    def configs(self) -> list[ModelConfig]:
        return list(self._configs.values())

    @property
    def backend_name(self) -> str | None:
        return self._backend.name if self._backend is not None else None

    def loaded_generation(self) -> dict[str, GenerationModel]:
        return dict(self._generation)

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._generation or model_id in self._embedding

    def card_kind(self, config: ModelConfig) -> CardKind:
        """What a model serves: chat (and completions), completions only (no chat template), or embeddings."""
        if config.kind == "embedding":
            return "embedding"
        if (model := self._generation.get(config.id)) is not None:
            return "chat" if model.has_chat_template else "completion"
        return _EMBEDDED_KINDS.get(config.source, "chat")

    def config(self, name: str, kind: Kind = "generate") -> ModelConfig:
        """The configured model a name means; `default` is the default model of the given kind."""
        if name == "default":
            name = self.settings.default_model if kind == "generate" else self.settings.default_embedding_model
        config = self._configs.get(name)
        if config is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist. Available: {', '.join(['default', *self._configs])}",
                param="model",
            )
        return config

    def resolve(self, name: str, kind: Kind) -> ModelConfig:
        """The model a request names, checked against the kind the route serves."""
        config = self.config(name, kind)
        if config.kind != kind:
            what = "an embedding model" if config.kind == "embedding" else "a generation model"
            raise InvalidRequestError(f"model {name!r} is {what} and cannot serve this route", param="model")
        return config

    def generation(self, name: str) -> GenerationModel:
        """The loaded generation model (loads it on first use; blocking, so call it off the event loop)."""
        config = self.resolve(name, "generate")
        if (model := self._generation.get(config.id)) is not None:
            return model
        with self._locks[config.id]:
            if config.id not in self._generation:
                from shared.generation.model import GenerationModel

                started = time.perf_counter()
                model_dir = resolve_generation_model(config, self.settings.cache_dir, self.settings.hub_offline)
                backend = self.backend
                self._generation[config.id] = GenerationModel(
                    config.id,
                    model_dir,
                    lambda: backend.load(model_dir),
                    max_model_len=self.settings.max_model_len,
                    max_prompt_tokens=self.settings.max_prompt_tokens,
                    max_completion_tokens=self.settings.max_completion_tokens,
                    max_running=self.settings.max_running,
                    prefill_chunk=self.settings.prefill_chunk,
                    max_queue=self.settings.max_queue,
                    prefix_tokens=self.settings.prefix_cache_tokens,
                    compute_thread=backend.compute_thread,
                )
                self.load_seconds[config.id] = time.perf_counter() - started
                log.info("loaded %s in %.1f s", config.id, self.load_seconds[config.id])
                release_freed_heap()
            return self._generation[config.id]

    def embedding(self, name: str) -> EmbeddingModel:
        """The loaded embedding model (loads it on first use)."""
        config = self.resolve(name, "embedding")
        if (model := self._embedding.get(config.id)) is not None:
            return model
        with self._locks[config.id]:
            if config.id not in self._embedding:
                from shared.embeddings import EmbeddingModel

                started = time.perf_counter()
                model_dir = resolve_embedding_model(config, self.settings.cache_dir)
                self._embedding[config.id] = EmbeddingModel(config.id, model_dir, self.settings.threads)
                self.load_seconds[config.id] = time.perf_counter() - started
                release_freed_heap()
            return self._embedding[config.id]

    def preload(self) -> None:
        for name in self.settings.preload:
            if name == "default-embedding":
                self.embedding("default")
            elif name == "default" or self._configs[name].kind == "generate":
                self.generation(name)
            else:
                self.embedding(name)

    def close(self) -> None:
        for model in self._generation.values():
            model.close()


def release_freed_heap() -> None:
    """Give the system back the heap memory that loading a model freed (glibc's `malloc_trim`).

    Parsing a tokenizer.json leaves its freed parse tree in the heap, where glibc keeps it for later allocations:
    Gemma 3's 33 MB file (262k tokens, 515k merges) held ~300 MB of a server's resident memory that way, and a
    GGUF's conversion in process ~500 MB. Elsewhere (macOS, musl) there is no such call and nothing is done.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
