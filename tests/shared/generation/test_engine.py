"""The engine runs model compute on its own thread, one per model: the server stays responsive while it works."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import httpx

LONG = {
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
    "max_tokens": 1500,
    "ignore_eos": True,
    "temperature": 0,
    "stream": True,
}


def content_frames(lines: Iterator[str]) -> Iterator[str]:
    """The stream's data frames; fails on an error frame or the end, since the generation must still run."""
    for line in lines:
        if line.startswith("data: "):
            assert line != "data: [DONE]" and "error" not in json.loads(line[6:]), line
            yield line
    raise AssertionError("the stream ended early")


def test_health_answers_promptly_while_a_long_prompt_is_prefilled(server_url: str) -> None:
    """A ~1500-token prompt takes seconds of prefill in 256-token chunks (~1 s each in float32 here), and
    /health never waits for a chunk: the model runs on the engine's thread, not the event loop."""
    prompt = f"{uuid.uuid4()} " + " ".join(f"item{i}" for i in range(400))  # unique: no prefix-cache hit
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    result: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: result.append(httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=300))
    )
    start = time.perf_counter()
    request.start()
    latencies = []
    while request.is_alive():
        probe = time.perf_counter()
        health = httpx.get(f"{server_url}/health", timeout=5)
        latencies.append(time.perf_counter() - probe)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        time.sleep(0.05)
    request.join()
    took = time.perf_counter() - start
    assert result and result[0].status_code == 200, result[0].text if result else "no response"
    assert result[0].json()["usage"]["prompt_tokens"] > 1000
    assert took > 1.0 and len(latencies) > 10, f"the prefill took {took:.2f} s: too short to probe during"
    assert max(latencies) < 0.5, f"/health took up to {max(latencies):.3f} s during a {took:.1f} s prefill"


def test_a_second_model_answers_while_the_first_is_busy(server_url: str) -> None:
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server_url}/v1/chat/completions", json=LONG) as response:
            assert response.status_code == 200
            frames = content_frames(response.iter_lines())
            for _ in range(3):
                next(frames)
            other = httpx.post(
                f"{server_url}/v1/completions",
                json={"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
                timeout=300,
            )
            assert other.status_code == 200, other.text
            assert (
                other.json()["usage"]["completion_tokens"] == 8 or other.json()["choices"][0]["finish_reason"] == "stop"
            )
            next(frames)  # the first model's 1500 tokens are still streaming: Gemma did not wait for them
