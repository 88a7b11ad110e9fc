"""The HTTP layer's edge cases: overload, errors in the middle of a stream, cold-start imports."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
from pydantic import BaseModel

from functions.app import build
from shared.errors import ModelLoadError
from shared.http import sse_frames
from shared.settings import Settings


class Chunk(BaseModel):
    text: str


async def test_an_error_mid_stream_becomes_an_sse_error_frame_without_done() -> None:
    async def chunks() -> AsyncIterator[BaseModel]:
        yield Chunk(text="partial")
        raise ModelLoadError("the model went away")

    frames = [frame["data"] async for frame in sse_frames(chunks())]
    assert json.loads(frames[0]) == {"text": "partial"}
    error = json.loads(frames[1])["error"]
    assert error["message"] == "the model went away" and error["code"] == "model_unavailable"
    assert "[DONE]" not in frames


async def test_a_frame_stays_one_line_to_a_reader_that_splits_at_unicode_line_breaks() -> None:
    """A model's text may hold U+2028, U+2029 or U+0085, which JSON may leave as they are but Python's
    str.splitlines (requests' iter_lines with decode_unicode) breaks lines at: escaped, each frame is one line
    whose JSON gives the text back."""
    text = "a\u2028b\u2029c\x85d\u00e9"

    async def chunks() -> AsyncIterator[BaseModel]:
        yield Chunk(text=text)

    frame = [frame["data"] async for frame in sse_frames(chunks())][0]
    assert frame.splitlines() == [frame] and json.loads(frame) == {"text": text}


async def test_a_full_queue_answers_503_with_retry_after_streamed_or_not_and_the_server_recovers() -> None:
    app = build(Settings(preload=[], max_running=1, max_queue=1))
    transport = httpx.ASGITransport(app=app)
    long = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 150, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://fnserve.test", timeout=120) as client:
            engine = (await asyncio.to_thread(app.state.catalog.generation, "default")).engine

            async def until(check: Callable[[], bool]) -> None:
                for _ in range(500):
                    if check():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError("the engine never reached the expected state")

            running = asyncio.create_task(client.post("/v1/chat/completions", json=long))
            await until(lambda: engine.stats.running == 1)
            queued = asyncio.create_task(client.post("/v1/chat/completions", json=long))
            await until(lambda: engine.stats.queued == 1)
            refused = await client.post("/v1/chat/completions", json=long)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "server_overloaded"
            # A streamed request too gets the 503 itself, not a 200 whose stream then carries the error.
            for path, body in (
                ("/v1/chat/completions", {**long, "stream": True}),
                ("/v1/completions", {"prompt": "Once", "max_tokens": 5, "stream": True}),
                ("/api/generate/stream", {"prompt": "Once", "max_tokens": 5}),
            ):
                streamed = await client.post(path, json=body)
                assert streamed.status_code == 503, (path, streamed.text)
                assert streamed.headers["retry-after"] == "1"
                assert streamed.json()["error"]["code"] == "server_overloaded"
            # n=2 with room for neither: refused whole, nothing of it left queued or running.
            assert (await client.post("/v1/chat/completions", json={**long, "n": 2})).status_code == 503
            assert (engine.stats.running, engine.stats.queued) == (1, 1)
            assert (await running).status_code == 200 and (await queued).status_code == 200  # accepted work is kept
            again = await client.post("/v1/chat/completions", json={**long, "max_tokens": 2})
            assert again.status_code == 200
    finally:
        app.state.catalog.close()


def test_the_models_function_imports_no_model_framework() -> None:
    code = (
        "import sys, functions.models; "
        "print([m for m in ('torch', 'transformers', 'mlx', 'fastembed', 'onnxruntime') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_chunked_body_over_the_limit_is_a_413_in_the_envelope(server_url: str) -> None:
    """A body without Content-Length used to get a 400 "error parsing the body" once it passed the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB against the test server's 1 MiB limit
        yield b'"}]}'

    response = httpx.post(
        f"{server_url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "1048576 bytes" in error["message"]


async def test_cors_allows_only_the_configured_origins() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    closed = build(Settings(preload=[]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=closed), base_url="http://t") as client:
        response = await client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers  # no origin is allowed by default
    opened = build(Settings(preload=[], cors_origins=["https://app.example"]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=opened), base_url="http://t") as client:
        response = await client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = await client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        listed = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert listed.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in listed.headers["access-control-expose-headers"].lower()


async def test_request_ids_are_taken_from_the_client_or_made() -> None:
    app = build(Settings(preload=[]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        given = await client.get("/v1/models", headers={"X-Request-ID": "trace-42"})
        assert given.headers["x-request-id"] == "trace-42"
        made = await client.get("/v1/models")
        assert len(made.headers["x-request-id"]) == 32
        junk = await client.get("/v1/models", headers={"X-Request-ID": "x" * 500})
        assert junk.headers["x-request-id"] != "x" * 500


async def test_embedding_requests_are_limited_and_get_backpressure() -> None:
    settings = Settings(
        preload=[],
        max_embedding_inputs=3,
        max_embedding_input_tokens=20,
        max_embedding_concurrency=1,
        max_embedding_queue=0,
    )
    app = build(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as client:
        too_many = await client.post("/v1/embeddings", json={"input": ["a", "b", "c", "d"]})
        assert too_many.status_code == 400 and "max_embedding_inputs" in too_many.json()["error"]["message"]
        too_long = await client.post("/v1/embeddings", json={"input": ["short", "word " * 30]})
        assert too_long.status_code == 400 and "input[1]" in too_long.json()["error"]["message"]
        too_long_ids = await client.post("/v1/embeddings", json={"input": [list(range(1000, 1030))]})
        assert too_long_ids.status_code == 400
        big = {"input": ["a sentence to embed, " * 3] * 3}
        results = await asyncio.gather(*(client.post("/v1/embeddings", json=big) for _ in range(6)))
        statuses = sorted(r.status_code for r in results)
        assert statuses[0] == 200 and 503 in statuses, statuses
        refused = next(r for r in results if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert (await client.post("/v1/embeddings", json=big)).status_code == 200  # and it recovers
