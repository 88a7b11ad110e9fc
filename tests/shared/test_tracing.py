"""OpenTelemetry: a request's span with queue, prefill and decode children; nothing at all when unset."""

from __future__ import annotations

import subprocess
import sys

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from functions.app import build
from shared.catalog import ModelCatalog
from shared.settings import Settings


async def test_a_generation_is_traced_with_its_phases(catalog: ModelCatalog) -> None:
    app = build(Settings(preload=[], otlp_endpoint="http://127.0.0.1:9/v1/traces"))
    assert app.state.tracer is not None  # the configured exporter; spans go to memory here instead
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app.state.tracer = provider.get_tracer("test")
    app.state.catalog = catalog  # the session's loaded model
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "trace-me"})
        assert response.status_code == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request = spans["POST /v1/chat/completions"]
    assert request.attributes is not None and request.attributes["fnserve.request_id"] == "trace-me"
    assert request.attributes["gen_ai.usage.output_tokens"] == 5
    phases = [spans["queue"], spans["prefill"], spans["decode"]]
    assert all(p.parent is not None and p.parent.span_id == request.context.span_id for p in phases)
    times = [t for p in phases for t in (p.start_time or 0, p.end_time or 0)]
    assert times == sorted(times) and request.start_time == times[0] and (request.end_time or 0) >= times[-1]


def test_no_tracing_sdk_is_imported_when_no_endpoint_is_set() -> None:
    """(Other libraries import the OpenTelemetry API by themselves; the SDK and exporter are fnserve's.)"""
    code = (
        "import sys; from functions.app import build; build(); "
        "print([m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
