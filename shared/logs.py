"""Logging: one JSON object a line for machines, or readable text on a terminal (settings.log_format).

The request middleware logs one line per request on `fnserve.access` with its fields under `fnserve`;
prompts and completions appear there only when settings.log_content is on. No key ever reaches a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from shared.settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fnserve", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fnserve", None) or {}
        extra = " ".join(
            f"{k}={v}" for k, v in fields.items() if v is not None and k not in ("method", "path", "status")
        )
        return f"{text} {extra}" if extra else text


def configure_logging(settings: Settings) -> None:
    """The root logger's one handler, on stderr, in the chosen format (uvicorn's loggers included)."""
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
