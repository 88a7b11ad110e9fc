"""POST /v1/chat/completions in-process, against the real embedded model."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from shared.generation.model import GenerationModel

CAPITAL = {"messages": [{"role": "user", "content": "Name the capital city of France."}], "temperature": 0}


async def test_chat_completion_answers_in_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CAPITAL, "model": "default"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "smollm2-135m-instruct"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_is_honoured_with_finish_reason_length(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json={**CAPITAL, "max_tokens": 3})).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_streamed_text_equals_the_plain_response(client: httpx.AsyncClient) -> None:
    plain = (await client.post("/v1/chat/completions", json=CAPITAL)).json()["choices"][0]["message"]["content"]
    payload = {**CAPITAL, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == plain
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


async def test_a_model_without_chat_template_gets_a_clear_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CAPITAL, "model": "gemma-3-270m"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "chat_template_missing" and "chat template" in error["message"]


async def test_bad_requests_get_the_openai_error_envelope(client: httpx.AsyncClient) -> None:
    cases = [
        (b"{not json", 400, None),
        (json.dumps({**CAPITAL, "model": "no-such-model"}).encode(), 404, "model_not_found"),
        (json.dumps({"messages": []}).encode(), 400, None),
        (json.dumps({**CAPITAL, "max_tokens": -1}).encode(), 400, None),
        (json.dumps({**CAPITAL, "temperature": "hot"}).encode(), 400, None),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, None),
    ]
    for body, status, code in cases:
        response = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code", "request_id"} and error["message"]
        assert error["request_id"] == response.headers["x-request-id"]
        if code:
            assert error["code"] == code


async def test_text_content_parts_developer_role_and_newer_fields_are_understood(client: httpx.AsyncClient) -> None:
    plain = (await client.post("/v1/chat/completions", json=CAPITAL)).json()
    parts = {
        "messages": [
            {"role": "developer", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Name the capital "}, {"type": "text", "text": "city of France."}],
            },
        ],
        "temperature": 0,
        "max_completion_tokens": 40,
        "user": "someone",
        "store": False,  # newer OpenAI fields are accepted and change nothing
        "metadata": {"k": "v"},
        "service_tier": "auto",
    }
    response = await client.post("/v1/chat/completions", json=parts)
    assert response.status_code == 200
    # The developer message is the template's own default system prompt, so the answer is the same.
    assert response.json()["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


async def test_max_completion_tokens_wins_over_max_tokens(client: httpx.AsyncClient) -> None:
    body = {**CAPITAL, "max_tokens": 30, "max_completion_tokens": 2}
    assert (await client.post("/v1/chat/completions", json=body)).json()["usage"]["completion_tokens"] == 2


async def test_templating_and_tokenizing_run_off_the_event_loop(
    client: httpx.AsyncClient, smol: GenerationModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long conversation's chat template and tokenizer used to run on the event loop, stalling every
    stream of the process while they worked."""
    loop_thread = threading.get_ident()
    threads: list[int] = []
    for name in ("encode_chat", "encode"):
        original = getattr(GenerationModel, name)

        def recording(self: GenerationModel, *args: Any, _original: Any = original) -> Any:
            threads.append(threading.get_ident())
            return _original(self, *args)

        monkeypatch.setattr(GenerationModel, name, recording)
    for path, body in (
        ("/v1/chat/completions", {**CAPITAL, "max_tokens": 1}),
        ("/v1/completions", {"prompt": "Once", "max_tokens": 1}),
        ("/api/generate/stream", {"prompt": "Once", "max_tokens": 1}),
    ):
        assert (await client.post(path, json=body)).status_code == 200
    assert len(threads) == 3 and loop_thread not in threads


async def test_a_negative_seed_samples_reproducibly(client: httpx.AsyncClient) -> None:
    """Seeds are 64-bit integers, signed or not (as other OpenAI-style servers take them); -1 was a 500."""
    body = {
        "messages": [{"role": "user", "content": "Write a line about the sea."}],
        "temperature": 1.0,
        "max_tokens": 12,
    }

    async def text(seed: int) -> str:
        response = await client.post("/v1/chat/completions", json={**body, "seed": seed})
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    assert await text(-1) == await text(-1)
    assert len({await text(s) for s in (-(2**63), -2, 2**64 - 1)}) > 1
