"""Chat over a WebSocket (/v1/chat/ws): several requests on one connection, each streamed as delta frames and a
done frame, `{"type": "stop"}` cancelling the one running.

Client -> server (JSON text frames):
    {"type": "auth", "api_key": "..."}                 only where no header can carry the key (browsers)
    {"messages": [...] | "prompt": "...", "model", "temperature", ..., "session_id"?, "api_key"?}
    {"type": "stop"}                                    cancels the running request within a step
Server -> client:
    {"type": "delta", "content": "..."}                 as tokens come
    {"type": "done", "finish_reason": "stop" | "length", "usage": {...}, "session_id"?}
    {"type": "error", "error": {"message", "type", "param", "code"}}   OpenAI's error shape; the connection stays

Keys, rate limits and the request checks are those of /v1/chat/completions, applied to every request. A
connection silent for `ws_idle_timeout` seconds, or open for `ws_max_seconds`, is closed; a dropped connection
cancels its request, which frees its place in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from shared.catalog import ModelCatalog
from shared.errors import FnserveError, InvalidRequestError, RequestTooLargeError
from shared.guards.access import Guards, RequestContext, request_context
from shared.protocol.chat import ChatCompletionRequest
from shared.protocol.common import UsageInfo
from shared.serving.chat import start
from shared.serving.jobs import Deltas

CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TOO_BIG = 1000, 1008, 1009


async def serve(socket: WebSocket, catalog: ModelCatalog) -> None:
    settings = catalog.settings
    guards: Guards = socket.app.state.guards
    await socket.accept()
    opened = time.monotonic()
    session_id = socket.query_params.get("session_id")
    key: str | None = None
    running: asyncio.Task[None] | None = None
    try:
        while True:
            left = settings.ws_max_seconds - (time.monotonic() - opened)
            try:
                raw = await asyncio.wait_for(socket.receive_text(), min(settings.ws_idle_timeout, max(left, 0.0)))
            except TimeoutError:
                if left > settings.ws_idle_timeout and running is not None and not running.done():
                    continue  # answering is not idle
                await socket.close(CLOSE_NORMAL, "idle" if left > settings.ws_idle_timeout else "time limit")
                return
            if len(raw.encode()) > settings.max_body_bytes:
                await _error(socket, RequestTooLargeError("the message is larger than max_body_bytes"))
                await socket.close(CLOSE_TOO_BIG)
                return
            try:
                message = json.loads(raw)
                if not isinstance(message, dict):
                    raise ValueError("a frame must be a JSON object")
            except ValueError as exc:
                await _error(socket, InvalidRequestError(f"the frame is not a JSON object: {exc}"))
                continue
            kind = message.get("type", "chat")
            if kind == "stop":
                if running is not None:
                    running.cancel()
                continue
            if kind == "auth":
                key = message.get("api_key") if isinstance(message.get("api_key"), str) else None
                continue
            if kind != "chat":
                await _error(socket, InvalidRequestError(f"unknown frame type {kind!r}", param="type"))
                continue
            if running is not None and not running.done():
                await _error(socket, InvalidRequestError("a request is running; send stop first, or wait for done"))
                continue
            presented = message.pop("api_key", None)
            running = asyncio.create_task(
                _answer(socket, catalog, guards, message, presented if isinstance(presented, str) else key, session_id)
            )
    except WebSocketDisconnect:
        pass
    finally:
        if running is not None:
            running.cancel()  # a dropped connection frees its place in the engine


async def _answer(
    socket: WebSocket,
    catalog: ModelCatalog,
    guards: Guards,
    message: dict[str, Any],
    key: str | None,
    session_id: str | None,
) -> None:
    started = None
    ctx = RequestContext(uuid.uuid4().hex, time.perf_counter())  # each request its own: timings, charge, log
    socket.state.fnserve = ctx
    try:
        await guards.admit(socket, key)
        body = {k: v for k, v in message.items() if k not in ("type", "stream", "prompt")}
        if "prompt" in message:
            body["messages"] = [{"role": "user", "content": message["prompt"]}]
        if session_id and "session_id" not in body:
            body["session_id"] = session_id
        if body.get("tools"):
            raise InvalidRequestError("tools are served by POST /v1/chat/completions, not here", param="tools")
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidRequestError(
                f"{first['msg']}: {'.'.join(str(p) for p in first['loc'])}", param=str(first["loc"][0])
            ) from None
        if (request.n or 1) != 1:
            raise InvalidRequestError("the WebSocket streams one choice (n = 1)", param="n")
        started = await start(request, catalog, socket)
        steps = Deltas(started.streams, started.tracker, logprobs=False)
        text, finish = "", None
        async for delta in steps:
            if delta.text:
                text += delta.text
                await socket.send_json({"type": "delta", "content": delta.text})
            finish = delta.finish_reason or finish
        if started.turn is not None and finish is not None:
            await started.turn.commit(text, None, len(started.prompt_ids), steps.completion_tokens)
        done: dict[str, Any] = {
            "type": "done",
            "finish_reason": finish,
            "usage": UsageInfo.of(len(started.prompt_ids), steps.completion_tokens).model_dump(),
        }
        if request.session_id:
            done["session_id"] = request.session_id
        await socket.send_json(done)
    except asyncio.CancelledError:  # stop, or the connection dropped: the streams close with the iterator
        if started is not None:
            for stream in started.streams:
                stream.close()
        try:
            await socket.send_json({"type": "done", "finish_reason": "cancelled", "usage": None})
        except Exception:  # noqa: BLE001 - the connection is gone
            pass
    except FnserveError as exc:
        await _error(socket, exc)
    finally:
        await ctx.charge()  # this request's tokens, as the HTTP middleware charges a request's


async def _error(socket: WebSocket, error: FnserveError) -> None:
    try:
        await socket.send_json({"type": "error", "error": error.to_dict(request_context(socket).request_id)["error"]})
    except Exception:  # noqa: BLE001 - the connection is gone
        pass
