"""The request log line: its fields, JSON or text, and prompts and completions only when asked for."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from functions.app import build
from shared.catalog import ModelCatalog
from shared.logs import JsonFormatter, TextFormatter
from shared.settings import Settings

BODY = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}


async def access_records(
    settings: Settings, catalog: ModelCatalog, caplog: pytest.LogCaptureFixture
) -> list[logging.LogRecord]:
    app = build(settings)
    app.state.catalog = catalog  # the session's loaded model
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fnserve.access"):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post("/v1/chat/completions", json=BODY, headers={"X-Request-ID": "log-1"})
            assert response.status_code == 200
    return [r for r in caplog.records if r.name == "fnserve.access"]


async def test_one_line_per_request_with_its_fields_and_no_content_by_default(
    catalog: ModelCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    (record,) = await access_records(Settings(preload=[]), catalog, caplog)
    fields = record.fnserve  # type: ignore[attr-defined]
    assert fields["request_id"] == "log-1" and fields["route"] == "/v1/chat/completions" and fields["status"] == 200
    assert fields["model"] == "smollm2-135m-instruct" and fields["completion_tokens"] >= 1
    assert fields["prompt_tokens"] > 0 and fields["ttft_ms"] is not None and fields["latency_ms"] > 0
    assert "completion" not in fields
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "log-1" and line["logger"] == "fnserve.access" and line["level"] == "info"
    text = TextFormatter().format(record)
    assert "POST /v1/chat/completions 200" in text and "request_id=log-1" in text


async def test_completions_are_logged_only_when_log_content_is_on(
    catalog: ModelCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    (record,) = await access_records(Settings(preload=[], log_content=True), catalog, caplog)
    (completion,) = record.fnserve["completion"]  # type: ignore[attr-defined]
    assert isinstance(completion, str) and completion
    assert record.fnserve["prompt"] == [{"role": "user", "content": "Say hi."}]  # type: ignore[attr-defined]
