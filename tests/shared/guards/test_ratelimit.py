"""Rate limits on real servers: the headers count down, request N+1 gets 429, a spoofed X-Forwarded-For
changes nothing, token budgets are charged, and two servers sharing one real Redis enforce one limit."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import redis

from shared.guards.ratelimit import duration, parse_duration
from tests.servers import Server, running_server


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0.059, 1.5, 360.0, 61.2)] == ["59ms", "1.5s", "6m0s", "1m1s"]
    assert [parse_duration(t) for t in ("59ms", "1.5s", "6m0s")] == [0.059, 1.5, 360.0]


def models(server: Server, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/models", headers=headers or {}, timeout=30)


def test_request_n_plus_one_is_refused_and_the_headers_count_down(tmp_path: Path) -> None:
    env = {"FNSERVE_PRELOAD": "[]", "FNSERVE_RATE_LIMIT_REQUESTS": "3"}
    with running_server(tmp_path / "fnserve.log", env) as server:
        remaining: list[int] = []
        for _ in range(3):
            response = models(server, {"X-Forwarded-For": f"203.0.113.{len(remaining)}"})  # spoofed: ignored
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "3"
            assert parse_duration(response.headers["x-ratelimit-reset-requests"]) <= 60
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [2, 1, 0]
        refused = models(server, {"X-Forwarded-For": "198.51.100.7"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # probes are never limited


def test_forwarded_addresses_count_only_from_trusted_proxies(tmp_path: Path) -> None:
    env = {"FNSERVE_PRELOAD": "[]", "FNSERVE_RATE_LIMIT_REQUESTS": "1", "FNSERVE_TRUSTED_PROXIES": '["127.0.0.1"]'}
    with running_server(tmp_path / "fnserve.log", env) as server:
        # behind a trusted proxy each client has its own budget: the nearest untrusted hop names it
        assert models(server, {"X-Forwarded-For": "203.0.113.1"}).status_code == 200
        assert models(server, {"X-Forwarded-For": "203.0.113.2"}).status_code == 200
        assert models(server, {"X-Forwarded-For": "203.0.113.1"}).status_code == 429
        # a client cannot prepend its way to a fresh budget: the proxy appends the real address last
        assert models(server, {"X-Forwarded-For": "10.9.9.9, 203.0.113.2"}).status_code == 429


def test_a_token_budget_is_charged_with_what_requests_used(tmp_path: Path) -> None:
    env = {"FNSERVE_PRELOAD": "[]", "FNSERVE_RATE_LIMIT_TOKENS": "20"}
    body = {"prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True, "temperature": 0}
    with running_server(tmp_path / "fnserve.log", env) as server:
        first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "20"
        used = first.json()["usage"]["total_tokens"]
        second = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=120)
        assert second.status_code == 200
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == 20 - used > 0
        # the streamed request was charged when its stream ended (what overshot the budget emptied it)
        time.sleep(0.2)
        third = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert third.status_code == 429, third.text
        assert "tokens per minute" in third.json()["error"]["message"]


def test_two_servers_sharing_one_redis_enforce_one_limit(tmp_path: Path, redis_url: str) -> None:
    env = {"FNSERVE_PRELOAD": "[]", "FNSERVE_RATE_LIMIT_REQUESTS": "4", "FNSERVE_RATE_LIMIT_STORAGE": redis_url}
    with (
        running_server(tmp_path / "a.log", env) as a,
        running_server(tmp_path / "b.log", env) as b,
    ):
        statuses = [models(server).status_code for server in (a, b, a, b)]
        assert statuses == [200, 200, 200, 200]
        assert models(b).headers["x-ratelimit-remaining-requests"] == "0"
        assert models(a).status_code == 429 and models(b).status_code == 429
    keys = redis.Redis.from_url(redis_url).keys("*")
    assert keys, "the counters live in Redis"
