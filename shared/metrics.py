"""Prometheus metrics of one app: HTTP requests, per-model latencies, rejections, and the engines' counters.

Names follow the peers' style (vLLM's `time_to_first_token_seconds`, ...) under the `fnserve_` prefix. Engine
counters are read when scraped, so they cost the request path nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shared.catalog import ModelCatalog

# Latency buckets in seconds: from a fast step on a GPU to a long answer on a CPU.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class EngineCollector(Collector):
    """One sample per loaded generation model (label `model`) for each engine counter."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "fnserve_requests_running", "Sequences in the engine's running batch", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "fnserve_requests_queued", "Requests waiting for a place in the batch", labels=["model"]
        )
        completed = CounterMetricFamily("fnserve_requests_completed", "Sequences that finished", labels=["model"])
        cancelled = CounterMetricFamily(
            "fnserve_requests_cancelled", "Sequences whose client went away before the end", labels=["model"]
        )
        failed = CounterMetricFamily("fnserve_requests_failed", "Sequences that ended with an error", labels=["model"])
        prompt = CounterMetricFamily(
            "fnserve_prompt_tokens",
            "Prompt tokens run through the model (prefix-cache hits excluded)",
            labels=["model"],
        )
        generated = CounterMetricFamily("fnserve_generation_tokens", "Tokens generated", labels=["model"])
        hits = CounterMetricFamily("fnserve_prefix_cache_hits", "Prompts that reused a cached prefix", labels=["model"])
        reused = CounterMetricFamily(
            "fnserve_prefix_cache_tokens",
            "Prompt tokens taken from the prefix cache instead of computed",
            labels=["model"],
        )
        load = GaugeMetricFamily(
            "fnserve_model_load_seconds", "How long each loaded model took to load", labels=["model"]
        )
        for model_id, seconds in self.catalog.load_seconds.items():
            load.add_metric([model_id], seconds)
        yield load
        for model_id, model in self.catalog.loaded_generation().items():
            stats = model.engine.stats
            for family, value in (
                (running, stats.running),
                (queued, stats.queued),
                (completed, stats.completed),
                (cancelled, stats.cancelled),
                (failed, stats.failed),
                (prompt, stats.prompt_tokens),
                (generated, stats.generated_tokens),
                (hits, stats.prefix_hits),
                (reused, stats.prefix_tokens),
            ):
                family.add_metric([model_id], value)
        yield from (running, queued, completed, cancelled, failed, prompt, generated, hits, reused)


class Metrics:
    """The app's own registry (not the process-wide default one, which every app in a process shares)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter(
            "fnserve_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.http_latency = Histogram(
            "fnserve_http_request_duration_seconds",
            "HTTP request latency, to the end of the response body",
            ["route", "method"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "fnserve_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            ["model"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "fnserve_inter_token_latency_seconds",
            "Gaps between successive tokens of a sequence",
            ["model"],
            buckets=_TOKEN_GAP,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            "fnserve_e2e_request_latency_seconds",
            "From the request's arrival to its last token",
            ["model"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "fnserve_request_queue_time_seconds",
            "Time a sequence waited for a place in the running batch",
            ["model"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.request_prompt_tokens = Counter(
            "fnserve_request_prompt_tokens",
            "Prompt tokens of answered requests (prefix-cache hits included)",
            ["model"],
            registry=registry,
        )
        self.request_generation_tokens = Counter(
            "fnserve_request_generation_tokens",
            "Tokens generated for answered requests",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            "fnserve_requests_rejected",
            "Requests refused before any work: rate limits (429), overload or drain (503)",
            ["reason"],
            registry=registry,
        )
        self.rate_limit_decisions = Counter(
            "fnserve_rate_limit_decisions",
            "Rate-limit checks, allowed or limited",
            ["decision"],
            registry=registry,
        )
        self.embedding_inputs = Counter(
            "fnserve_embedding_inputs",
            "Inputs embedded",
            ["model"],
            registry=registry,
        )

    def watch(self, catalog: ModelCatalog) -> None:
        self.registry.register(EngineCollector(catalog))
