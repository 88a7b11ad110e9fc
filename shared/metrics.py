"""Prometheus metrics: each loaded model's engine counters, read when scraped (nothing on the request path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.catalog import ModelCatalog


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
        for model_id, model in self.catalog.loaded_generation().items():
            stats = model.engine.stats
            for family, value in (
                (running, stats.running),
                (queued, stats.queued),
                (completed, stats.completed),
                (cancelled, stats.cancelled),
                (prompt, stats.prompt_tokens),
                (generated, stats.generated_tokens),
                (hits, stats.prefix_hits),
                (reused, stats.prefix_tokens),
            ):
                family.add_metric([model_id], value)
        yield from (running, queued, completed, cancelled, prompt, generated, hits, reused)


def registry(catalog: ModelCatalog) -> CollectorRegistry:
    """A registry of this app's own (not the process-wide default one, which every app in a process shares)."""
    own = CollectorRegistry()
    own.register(EngineCollector(catalog))
    return own
