"""The compatibility routes: OpenAI paths without /v1, and the simple /api/* shapes."""

from __future__ import annotations

import json

import httpx

CAPITAL = [{"role": "user", "content": "Name the capital city of France."}]


async def test_routes_without_v1_are_the_same_functions(client: httpx.AsyncClient) -> None:
    body = {"messages": CAPITAL, "temperature": 0, "max_tokens": 12}
    plain = (await client.post("/chat/completions", json=body)).json()
    v1 = (await client.post("/v1/chat/completions", json=body)).json()
    assert plain["choices"] == v1["choices"]
    assert (await client.get("/models")).json()["data"] == (await client.get("/v1/models")).json()["data"]
    completion = (await client.post("/completions", json={"prompt": "One, two,", "max_tokens": 3})).json()
    assert completion["object"] == "text_completion"
    assert len((await client.post("/embeddings", json={"input": "hi"})).json()["data"][0]["embedding"]) == 384


async def test_api_generate_has_the_simple_shape(client: httpx.AsyncClient) -> None:
    body = {"prompt": "The capital of France is", "model": "gemma-3-270m", "max_tokens": 6, "temperature": 0}
    result = (await client.post("/api/generate", json=body)).json()
    assert set(result) == {"text", "model", "tokens_generated", "finish_reason"}
    assert result["model"] == "gemma-3-270m" and result["tokens_generated"] == 6 and result["finish_reason"] == "length"


async def test_api_generate_stream_sends_text_deltas(client: httpx.AsyncClient) -> None:
    body = {"prompt": "The capital of France is", "model": "gemma-3-270m", "max_tokens": 6, "temperature": 0}
    whole = (await client.post("/api/generate", json=body)).json()
    async with client.stream("POST", "/api/generate/stream", json=body) as response:
        frames = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    parts = [json.loads(f) for f in frames[:-1]]
    assert "".join(p["text"] for p in parts) == whole["text"]
    assert parts[-1]["finish_reason"] == "length" and parts[-1]["tokens_generated"] == 6


async def test_api_chat_and_api_models(client: httpx.AsyncClient) -> None:
    result = (await client.post("/api/chat", json={"messages": CAPITAL, "temperature": 0})).json()
    assert result["message"]["role"] == "assistant" and "Paris" in result["message"]["content"]
    assert result["finish_reason"] == "stop" and result["tokens_generated"] > 0
    models = (await client.get("/api/models")).json()
    assert models["default"] == "smollm2-135m-instruct"
    assert {"id": "all-minilm-l6-v2", "kind": "embedding"} in models["models"]


async def test_api_routes_reject_bad_input_with_the_envelope(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/generate", json={"prompt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = await client.post("/api/chat", json={"messages": CAPITAL, "model": "nope"})
    assert response.status_code == 404


async def test_openapi_describes_every_route(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/api/generate"):
        operation = next(iter(spec["paths"][path].values()))
        assert operation.get("description") or operation.get("summary"), path
    assert (await client.get("/docs")).status_code == 200
