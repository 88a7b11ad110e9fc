"""/metrics: the engine's counters in Prometheus' text format, as a scraper reads them."""

from __future__ import annotations

import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from functions.app import build
from shared.settings import Settings


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
    for question in ("Name the capital city of France.", "What is 2+2?"):
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


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels (parsed with prometheus-client's own parser)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


async def test_request_metrics_move_for_plain_streamed_failed_and_rejected_requests(client: httpx.AsyncClient) -> None:
    smol = "smollm2-135m-instruct"
    body = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 6, "temperature": 0}
    before = samples((await client.get("/metrics")).text)
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert (await client.post("/v1/chat/completions", json={**body, "temperature": 9})).status_code == 400
    after = samples((await client.get("/metrics")).text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"route": "/v1/chat/completions", "method": "POST"}
    assert delta("fnserve_http_requests_total", **route, status="200") == 2
    assert delta("fnserve_http_requests_total", **route, status="400") == 1
    assert delta("fnserve_http_request_duration_seconds_count", **route) == 3
    for histogram in (
        "fnserve_time_to_first_token_seconds",
        "fnserve_e2e_request_latency_seconds",
        "fnserve_request_queue_time_seconds",
    ):
        assert delta(f"{histogram}_count", model=smol) == 2, histogram
        assert delta(f"{histogram}_sum", model=smol) > 0, histogram
    assert delta("fnserve_inter_token_latency_seconds_count", model=smol) == 2 * (6 - 1)
    assert delta("fnserve_request_generation_tokens_total", model=smol) == 12
    assert value(after, "fnserve_model_load_seconds", model=smol) > 0


async def test_rejections_and_rate_limit_decisions_are_counted() -> None:
    app = build(Settings(preload=[], rate_limit_requests=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 429
        scrape = samples((await client.get("/metrics")).text)
    assert value(scrape, "fnserve_rate_limit_decisions_total", decision="allowed") == 1
    assert value(scrape, "fnserve_rate_limit_decisions_total", decision="limited") == 1
    assert value(scrape, "fnserve_requests_rejected_total", reason="rate_limit") == 1


async def test_metrics_can_ask_for_their_own_token() -> None:
    app = build(Settings(preload=[], metrics_token=SecretStr("scrape-me")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})).status_code == 200
