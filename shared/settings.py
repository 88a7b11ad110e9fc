"""fnserve's one settings object: environment (FNSERVE_*), an optional TOML file, then defaults."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from ipaddress import ip_network
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BackendName = Literal["auto", "mlx", "cuda", "cpu"]
DType = Literal["auto", "float32", "bfloat16"]
ModelKind = Literal["generate", "embedding"]
Quantization = Literal["auto", "none", "int4", "int4-a8", "int8", "mixed"]

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


# The engine's defaults, here once: Settings' fields and the engine's own keyword defaults both use them.
MAX_RUNNING = 32
MAX_QUEUE = 256
PREFILL_CHUNK = 256


class SettingsError(ValueError):
    """Settings that cannot be read at all (a missing config file, an unknown variable): start-up stops."""


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fnserve"


class ModelConfig(BaseModel):
    """One servable model: an id clients use, where its weights come from, and what it does."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str = Field(description="'embedded:<name>', a local GGUF file, a local Hugging Face directory, or a hub id")
    kind: ModelKind = "generate"
    gguf_file: str | None = Field(default=None, description="GGUF file name inside a hub repo or directory")
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

    model_config = SettingsConfigDict(env_prefix="FNSERVE_", env_nested_delimiter="__", extra="forbid")

    # --- server ---
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    ssl_certfile: Path | None = Field(default=None, description="TLS certificate (PEM): serve HTTPS")
    ssl_keyfile: Path | None = Field(default=None, description="its private key (PEM)")
    drain_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="on SIGTERM, how long running requests may take to finish"
    )

    backend: BackendName = Field(default="auto", description="auto picks MLX on Apple Silicon, CUDA, then CPU")
    dtype: DType = Field(
        default="auto",
        description="auto: bfloat16 on CUDA; float32 on CPU, but bfloat16 for the weights quantization auto"
        " leaves unquantized",
    )
    threads: int | None = Field(default=None, ge=1, le=1024, description="CPU threads for the model")
    kernel_cpu: str = Field(
        default="auto",
        pattern=r"^[a-z0-9][a-z0-9.+_-]*$",
        description="the CPU numba's prebuilt kernels (an image's) run as: auto, the best one they were compiled"
        " for that this host runs; or one of their names (x86-64-v3, x86-64-v4+avx512vnni): the same kernels, and"
        " the same answers at near ties, on every host",
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    hub_offline: bool = Field(
        default=False, description="never reach the Hugging Face hub: hub models only from the local HF cache"
    )

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
        default="auto",
        description=(
            "batched CPU engine only. auto (default): int4-a8 where the model's layer weights are 4-bit groups"
            " already (a GGUF's Q4_0/Q4_1, as the embedded SmolLM2), so nothing rounds twice (int4 on a CPU"
            " without AVX2 or AVX-512 VNNI, e.g. arm64); otherwise, on a CPU with AVX2 or AVX-512 VNNI where the"
            " embedding is 8-bit groups (a GGUF's Q8_0), each projection as stored: Q8_0, Q5_0 and Q4_0 groups"
            " exactly on the 8-bit kernel, Q4_K groups exactly on int4-a8's kernel, the rest unquantized (Gemma 3's"
            " Q4_K_M: 13x closer to its weights than llama.cpp; from 4 rows in float32 where torch has no bfloat16"
            " oneDNN, e.g. AVX2 without AVX-512);"
            " otherwise none, in bfloat16 where dtype is auto."
            " int4: 4-bit weights in groups of 32, the output head at 8 bits, bfloat16 activations; int4-a8: the"
            " same weights, activations at 8 bits in groups of 32 (llama.cpp's arithmetic: as faithful as"
            " llama.cpp, 10x further from float32 than int4, faster under load); none: the"
            " weights as stored, in the dtype (float32 on CPU: exact); int8: 8-bit weights and activations"
            " (integer matmuls); mixed: int4 for decode steps of a few rows, int8 for larger steps and prefill"
            " (fastest under load, less faithful)"
        ),
    )
    cuda_graphs: bool = Field(
        default=False,
        description="batched engine on CUDA: decode steps replay CUDA graphs, one a batch size and cache length"
        " (powers of two up to the slots and the context, captured as the model loads), which launch a step's kernels"
        " at once",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="cap on a model's context length (batched engine: 2048 unless set)"
    )
    max_running: int = Field(default=MAX_RUNNING, ge=1, le=1024, description="sequences a model's engine runs together")
    prefill_chunk: int = Field(default=PREFILL_CHUNK, ge=16, description="prompt tokens prefilled per engine step")
    prefix_cache_slots: int = Field(
        default=16, ge=0, description="prompts and conversations kept for prefix reuse (batched engine)"
    )
    prefix_cache_tokens: int = Field(
        default=8192,
        ge=0,
        description="positions the kept prompts and conversations hold together (SmolLM2: 46 KB each on CPU)",
    )
    max_queue: int = Field(default=MAX_QUEUE, ge=1, description="requests waiting per model before 503")
    allowed_models: list[str] | None = Field(
        default=None, description="serve only these model ids (the defaults must be among them); None: all"
    )

    # --- request limits (each violation is a 400 or 413 that names the limit) ---
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="prompt tokens; None: the context")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="cap on max_tokens; None: the context")
    max_n: int = Field(default=16, ge=1, le=128, description="choices per request")
    max_messages: int = Field(default=1024, ge=1, description="messages per chat request")
    max_stop: int = Field(default=16, ge=0, description="stop strings per request")
    max_logit_bias: int = Field(default=300, ge=0, description="logit_bias entries per request")
    max_schema_bytes: int = Field(
        default=32 * 1024, ge=256, description="a response_format schema or a request's tools, as JSON"
    )
    grammar_timeout: float = Field(default=5.0, gt=0, description="seconds to compile a schema into its grammar")

    # --- conversations kept on the server (/v1/sessions, session_id) ---
    session_store: str | None = Field(
        default=None,
        description="sqlite:///path (None: sessions.db in cache_dir), redis://host:port/db, or dynamodb://table",
    )
    session_ttl: float = Field(default=30 * 24 * 3600, gt=0, description="seconds a session lives after a change")
    max_sessions: int = Field(default=1000, ge=1, description="sessions per owner (API key); the oldest go first")
    ws_idle_timeout: float = Field(default=300.0, gt=0, description="seconds a WebSocket may stay silent")
    ws_max_seconds: float = Field(default=3600.0, gt=0, description="seconds a WebSocket connection may last")
    max_embedding_inputs: int = Field(default=2048, ge=1, description="inputs per embedding request")
    max_embedding_input_tokens: int = Field(
        default=8192, ge=1, description="tokens per embedding input (longer inputs than the model reads are truncated)"
    )
    max_embedding_concurrency: int = Field(default=4, ge=1, description="embedding requests computed at once")
    max_embedding_queue: int = Field(default=64, ge=0, description="embedding requests waiting before 503")

    # --- security ---
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="accepted API keys (plain; hashed when read); none and no file: no auth"
    )
    api_keys_file: Path | None = Field(
        default=None, description="TOML file of [[keys]] (name, sha256, enabled, limits): `fnserve keys create`"
    )
    api_keys_secret: str | None = Field(
        default=None,
        description="an AWS Secrets Manager secret (name or ARN) holding a JSON list of keys (needs the `aws` extra)",
    )
    metrics_token: SecretStr | None = Field(default=None, description="bearer token /metrics asks for; None: open")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call from a browser")
    cors_methods: list[str] = Field(default_factory=lambda: ["GET", "POST"])
    cors_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Content-Type", "api-key", "X-Request-ID"]
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or networks whose X-Forwarded-For is believed"
    )
    rate_limit_requests: int | None = Field(default=None, ge=1, description="requests per minute per key or address")
    rate_limit_tokens: int | None = Field(
        default=None, ge=1, description="prompt + completion tokens per minute per key or address"
    )
    rate_limit_storage: str = Field(
        default="memory://", description="memory:// (this process) or redis://host:port/db (shared by instances)"
    )

    # --- batch embedding (functions/batch_embed.py, fnserve batch-embed) ---
    batch_output_prefix: str = Field(
        default="embeddings/", description="results go under this prefix (never read back as input)"
    )
    batch_output_bucket: str | None = Field(default=None, description="results' bucket; None: the input's")
    batch_output_format: Literal["jsonl", "parquet"] = "jsonl"
    batch_text_field: str = Field(default="text", description="the text's field in JSONL inputs")
    batch_size: int = Field(default=256, ge=1, le=4096, description="documents embedded together")
    batch_error_budget: float = Field(
        default=0.05, ge=0, le=1, description="share of bad lines a file may have and still complete"
    )
    batch_model: str = Field(default="default", description="the embedding model (default: default_embedding_model)")
    batch_idempotency_table: str | None = Field(
        default=None, description="DynamoDB table that keeps a redelivered object from being embedded twice"
    )
    batch_idempotency_seconds: int = Field(default=7 * 24 * 3600, ge=60, description="how long it remembers")
    batch_time_margin_seconds: float = Field(
        default=20.0, ge=0, description="unfinished work goes back to the queue this long before a Lambda timeout"
    )

    # --- observability ---
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: text on a terminal, JSON lines otherwise"
    )
    log_content: bool = Field(default=False, description="put prompts and completions in the request log")
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP endpoint for traces (needs the `otel` extra); None: no tracing"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        _check_environment(settings_cls)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("FNSERVE_CONFIG")
        if config:
            if not Path(config).is_file():
                raise SettingsError(f"FNSERVE_CONFIG names {config!r}, which is not a readable file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        for proxy in value:
            try:
                ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network") from None
        return value

    @field_validator("rate_limit_storage")
    @classmethod
    def _storage_is_known(cls, value: str) -> str:
        if not value.startswith(("memory://", "redis://", "rediss://")):
            raise ValueError(f"{value!r}: use memory:// or redis://host:port")
        return value

    @model_validator(mode="after")
    def _files_exist(self) -> Settings:
        for name in ("ssl_certfile", "ssl_keyfile", "api_keys_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}={str(path)!r} is not a readable file")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: set both or neither")
        return self

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
        if self.allowed_models is not None:
            missing = [a for a in self.allowed_models if a not in kinds]
            if missing:
                raise ValueError(f"allowed_models names unknown models: {', '.join(missing)}")
            aliases = ("default", "default-embedding")
            wanted = [self.default_model, self.default_embedding_model, *(p for p in self.preload if p not in aliases)]
            outside = [name for name in wanted if name not in self.allowed_models]
            if outside:
                raise ValueError(f"not in allowed_models: {', '.join(outside)} (a default or preloaded model)")
        return self

    @property
    def all_models(self) -> list[ModelConfig]:
        return [*EMBEDDED_MODELS, *self.models]

    @property
    def served_models(self) -> list[ModelConfig]:
        """The configured models this server answers for (all of them unless allowed_models narrows it)."""
        allowed = self.allowed_models
        return [m for m in self.all_models if allowed is None or m.id in allowed]


# FNSERVE_* variables that are not settings: the config file's name, what the command-line client reads, and
# the load tests' FNSERVE_LT_* (loadtests/locustfile.py).
_NOT_SETTINGS = {"CONFIG", "URL", "API_KEY"}
_NOT_SETTINGS_PREFIX = "LT_"


def _check_environment(settings_cls: type[BaseSettings]) -> None:
    """An FNSERVE_* variable that names no setting is a typo that would be ignored silently: refuse it."""
    for name in os.environ:
        if not name.upper().startswith("FNSERVE_"):
            continue
        field = name[len("FNSERVE_") :].split("__")[0]
        if field.upper().startswith(_NOT_SETTINGS_PREFIX):
            continue
        if field.upper() not in _NOT_SETTINGS and field.lower() not in settings_cls.model_fields:
            raise SettingsError(f"environment variable {name} names no setting (see docs/fnserve.example.toml)")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
