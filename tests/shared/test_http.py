"""The HTTP layer's edge cases: overload, errors in the middle of a stream, cold-start imports."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

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
