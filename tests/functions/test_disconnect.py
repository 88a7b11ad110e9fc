"""A client that drops a stream frees its generation: the engine reports no running request shortly after."""

from __future__ import annotations

import time

import httpx


def running(server_url: str) -> int:
    models = httpx.get(f"{server_url}/health", timeout=10).json()["models"]
    return sum(m["running"] + m["queued"] for m in models.values())


def test_dropping_a_stream_cancels_its_generation(server_url: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server_url}/v1/chat/completions", json=body) as response:
            frames = 0
            for line in response.iter_lines():
                frames += line.startswith("data: ")
                if frames >= 5:
                    break
            assert running(server_url) >= 1  # still generating: 1500 tokens take far longer than this
    deadline = time.monotonic() + 5
    while running(server_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server_url) == 0, httpx.get(f"{server_url}/health").text


def test_a_client_that_gives_up_on_a_plain_request_frees_its_generation(server_url: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    try:
        httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=1.5)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError("1500 tokens cannot come back within 1.5 s")
    deadline = time.monotonic() + 5
    while running(server_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server_url) == 0, httpx.get(f"{server_url}/health").text
