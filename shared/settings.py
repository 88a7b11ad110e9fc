"""fnserve's one settings object: environment (FNSERVE_*), an optional TOML file, then defaults."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BackendName = Literal["auto", "mlx", "cuda", "cpu"]
DType = Literal["auto", "float32", "bfloat16"]
ModelKind = Literal["generate", "embedding"]
Quantization = Literal["none", "int4", "int8", "mixed"]

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fnserve"


class ModelConfig(BaseModel):
    """One servable model: an id clients use, where its weights come from, and what it does."""

    id: str
    source: str = Field(description="'embedded:<name>', a local GGUF file, a local Hugging Face directory, or a hub id")
    kind: ModelKind = "generate"
    gguf_file: str | None = Field(default=None, description="GGUF file name inside a hub repo or directory")
    tokenizer: str | None = Field(default=None, description="where to take the tokenizer from, if elsewhere")
    owned_by: str = "fnserve"

    @field_validator("id")
    @classmethod
    def _id_is_plain(cls, value: str) -> str:
        if not _MODEL_ID.match(value) or value == "default":
            raise ValueError(f"model id {value!r} must be 1-128 of [A-Za-z0-9._:/-] and not 'default'")
        return value


EMBEDDED_MODELS: tuple[ModelConfig, ...] = (
    ModelConfig(id="smollm2-135m-instruct", source="embedded:smollm2-135m-instruct", owned_by="HuggingFaceTB"),
    ModelConfig(id="gemma-3-270m", source="embedded:gemma-3-270m", owned_by="google"),
    ModelConfig(
        id="all-minilm-l6-v2",
        source="embedded:all-minilm-l6-v2",
        kind="embedding",
        owned_by="sentence-transformers",
    ),
)


class Settings(BaseSettings):
    """Everything fnserve can be told. Env: FNSERVE_<FIELD>; TOML: the file named by FNSERVE_CONFIG."""

    model_config = SettingsConfigDict(env_prefix="FNSERVE_", env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    backend: BackendName = Field(default="auto", description="auto picks MLX on Apple Silicon, CUDA, then CPU")
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 elsewhere")
    threads: int | None = Field(default=None, ge=1, le=1024, description="CPU threads for the model")
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    models: list[ModelConfig] = Field(default_factory=list, description="models served beside the embedded")
    default_model: str = "smollm2-135m-instruct"
    default_embedding_model: str = "all-minilm-l6-v2"
    preload: list[str] = Field(default_factory=lambda: ["default"], description="model ids loaded at start")

    engine: Literal["batched", "simple"] = Field(
        default="batched",
        description="batched: continuous batching over a static KV cache (Llama-family models on torch CPU); "
        "simple: one transformers forward per sequence and step (every architecture)",
    )
    quantization: Quantization = Field(
        default="none",
        description=(
            "batched CPU engine only. int4: 4-bit weights (groups of 32), bfloat16 activations; int8: 8-bit weights"
            " and 8-bit activations (integer matmuls); mixed: int4 for decode steps of a few rows, int8 for larger"
            " steps and prefill (fastest under load, ~200 MB of weights)"
        ),
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="cap on a model's context length (batched engine: 2048 unless set)"
    )
    max_running: int = Field(default=32, ge=1, le=1024, description="sequences a model's engine runs together")
    prefill_chunk: int = Field(default=256, ge=16, description="prompt tokens prefilled per engine step")
    prefix_cache_slots: int = Field(default=4, ge=0, description="prompts kept for prefix reuse (batched engine)")
    max_queue: int = Field(default=256, ge=1, description="requests waiting per model before 503")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("FNSERVE_CONFIG")
        if config:
            if not Path(config).is_file():
                raise ValueError(f"FNSERVE_CONFIG names {config!r}, which is not a readable file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)

    @model_validator(mode="after")
    def _models_are_consistent(self) -> Settings:
        ids = [m.id for m in self.all_models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids configured twice: {', '.join(duplicates)}")
        kinds = {m.id: m.kind for m in self.all_models}
        for name, field, kind in (
            (self.default_model, "default_model", "generate"),
            (self.default_embedding_model, "default_embedding_model", "embedding"),
        ):
            if kinds.get(name) != kind:
                raise ValueError(f"{field}={name!r} is not a configured {kind} model (have: {', '.join(ids)})")
        unknown = [p for p in self.preload if p not in ("default", "default-embedding") and p not in kinds]
        if unknown:
            raise ValueError(f"preload names unknown models: {', '.join(unknown)}")
        return self

    @property
    def all_models(self) -> list[ModelConfig]:
        return [*EMBEDDED_MODELS, *self.models]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
