"""OpenTelemetry traces, when settings.otlp_endpoint names a collector (the optional `otel` extra).

One span per request, with children for the generation's phases: `queue` (waiting for a place in the running
batch), `prefill` (the prompt, up to the first token) and `decode` (the rest). Nothing is imported, and no
span is made, when no endpoint is set.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from shared.settings import Settings, SettingsError

if TYPE_CHECKING:
    from shared.guards.access import RequestContext


def make_tracer(settings: Settings) -> Any:
    """A tracer exporting to the configured OTLP/HTTP endpoint, or None."""
    if not settings.otlp_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise SettingsError(
            "otlp_endpoint is set, but OpenTelemetry is not installed: pip install 'fnserve[otel]'"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": "fnserve"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    return provider.get_tracer("fnserve")


def record_request(tracer: Any, ctx: RequestContext, attributes: dict[str, Any]) -> None:
    """The request's span and its phases' children, from the times the request path noted (perf_counter)."""
    from opentelemetry import trace

    offset = time.time_ns() - time.perf_counter_ns()  # perf_counter seconds -> epoch nanoseconds

    def ns(t: float) -> int:
        return offset + int(t * 1e9)

    end = time.perf_counter()
    name = f"{attributes.get('http.request.method', '')} {attributes.get('http.route', '')}".strip()
    span = tracer.start_span(name, start_time=ns(ctx.started), attributes=attributes)
    context = trace.set_span_in_context(span)
    phases = []
    if ctx.admitted is not None:
        phases.append(("queue", ctx.started, ctx.admitted))
        if ctx.first_token is not None:
            phases.append(("prefill", ctx.admitted, ctx.first_token))
            phases.append(("decode", ctx.first_token, ctx.finished or end))
    for phase, start, stop in phases:
        tracer.start_span(phase, context=context, start_time=ns(start)).end(end_time=ns(stop))
    span.end(end_time=ns(end))
