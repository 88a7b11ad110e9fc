"""/metrics: the engine's counters in Prometheus' text format, as a scraper reads them."""

from __future__ import annotations

import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.labels.get("model") == "smollm2-135m-instruct"
    }


async def test_metrics_count_tokens_and_prefix_cache_hits(client: httpx.AsyncClient) -> None:
    system = {"role": "system", "content": f"{uuid.uuid4()} You are a careful assistant. " * 20}
    before = await scrape(client)
    usages = []
    for question in ("What is the capital of France?", "What is 2+2?"):
        body = {"messages": [system, {"role": "user", "content": question}], "max_tokens": 5, "temperature": 0}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        usages.append(response.json()["usage"])
    after = await scrape(client)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("fnserve_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("fnserve_requests_completed_total") == 2
    assert delta("fnserve_prefix_cache_hits_total") == 1  # the second request reused the long system prompt
    reused = delta("fnserve_prefix_cache_tokens_total")
    assert reused > 200
    assert delta("fnserve_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages) - reused
    assert after["fnserve_requests_running"] == 0 and after["fnserve_requests_queued"] == 0
