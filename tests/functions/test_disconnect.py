"""A client that drops a request frees its generation: the engine counts it cancelled, long before it could end."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

LONG = {
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
    "max_tokens": 1500,
    "ignore_eos": True,
}


def engine(server_url: str) -> dict[str, int]:
    """The default model's counters, summed over loaded models (the tests here use only the default)."""
    models = httpx.get(f"{server_url}/health", timeout=10).json()["models"]
    keys = ("running", "queued", "completed", "cancelled")
    return {k: sum(m[k] for m in models.values()) for k in keys}


def wait_until_idle(server_url: str, within: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + within
    while (now := engine(server_url))["running"] + now["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def counters_before(server_url: str) -> dict[str, Any]:
    httpx.post(f"{server_url}/v1/chat/completions", json={**LONG, "max_tokens": 1}, timeout=120).raise_for_status()
    return wait_until_idle(server_url)  # the model is loaded and nothing else runs


def test_dropping_a_stream_cancels_its_generation(server_url: str) -> None:
    before = counters_before(server_url)
    frames: list[str] = []
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server_url}/v1/chat/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frames.append(line)
                if len(frames) >= 5:
                    break
    assert len(frames) == 5 and "[DONE]" not in frames[-1], frames
    assert all("error" not in json.loads(frame[6:]) for frame in frames), frames
    after = wait_until_idle(server_url)
    assert after["running"] + after["queued"] == 0, after
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["completed"] == before["completed"], (before, after)  # it did not run its 1500 tokens out


def test_a_client_that_gives_up_on_a_plain_request_frees_its_generation(server_url: str) -> None:
    before = counters_before(server_url)
    try:
        httpx.post(f"{server_url}/v1/chat/completions", json=LONG, timeout=1.5)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError("1500 tokens cannot come back within 1.5 s")
    after = wait_until_idle(server_url)
    assert after["running"] + after["queued"] == 0, after
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["completed"] == before["completed"], (before, after)
