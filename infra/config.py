"""What every stack reads from `pulumi config`: region, image, model, sizes, domain, instances, the API keys."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pulumi

PORT = 8000
HEALTH_PATH = "/health"  # liveness: the process answers
READY_PATH = "/readiness"  # readiness: models loaded, not draining


@dataclass(frozen=True)
class StackConfig:
    name: str = "fnserve"
    region: str | None = None
    image: str | None = None  # an image reference to run; None: the stack's own repository, tag `image_tag`
    image_tag: str = "latest"
    model: str = "smollm2-135m-instruct"
    domain: str | None = None
    min_instances: int = 1
    max_instances: int = 2
    drain_seconds: int = 30
    api_keys: pulumi.Output[str] | None = None  # a JSON list of keys, always a secret
    settings: dict[str, str] = field(default_factory=dict)  # more FNSERVE_* settings, plain
    raw: pulumi.Config | None = None

    @classmethod
    def read(cls, config: pulumi.Config | None = None) -> StackConfig:
        config = config or pulumi.Config()
        return cls(
            name=config.get("name") or "fnserve",
            region=config.get("region"),
            image=config.get("image"),
            image_tag=config.get("imageTag") or "latest",
            model=config.get("model") or "smollm2-135m-instruct",
            domain=config.get("domain"),
            min_instances=_int(config, "minInstances", 1),  # 0 is a value: scale to zero
            max_instances=_int(config, "maxInstances", 2),
            drain_seconds=_int(config, "drainSeconds", 30),
            api_keys=config.get_secret("apiKeys"),
            settings=_plain_settings(config.get_object("settings") or {}),
            raw=config,
        )

    def get(self, key: str, default: Any = None) -> Any:
        """A stack-specific value (sizes, instance types) from the same config namespace: JSON where it parses
        (numbers, booleans, lists, maps), else the plain string."""
        raw = self.raw.get(key) if self.raw is not None else None
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def environment(self) -> dict[str, str]:
        """The FNSERVE_* environment every deployment runs with (keys come apart, as a secret)."""
        env = {
            "FNSERVE_HOST": "0.0.0.0",
            "FNSERVE_PORT": str(PORT),
            "FNSERVE_DEFAULT_MODEL": self.model,
            "FNSERVE_DRAIN_SECONDS": str(self.drain_seconds),
            "FNSERVE_LOG_FORMAT": "json",
        }
        env.update({f"FNSERVE_{k.upper()}": str(v) for k, v in self.settings.items()})
        return env


_SECRET_SETTINGS = ("api_keys", "metrics_token")


def _plain_settings(settings: dict[str, Any]) -> dict[str, str]:
    secret = [k for k in settings if k.lower() in _SECRET_SETTINGS]
    if secret:
        raise ValueError(f"fnserve:settings holds {', '.join(secret)}: set it with `pulumi config set --secret`")
    return {str(k): str(v) for k, v in settings.items()}


def _int(config: pulumi.Config, key: str, default: int) -> int:
    value = config.get_int(key)
    return default if value is None else value
