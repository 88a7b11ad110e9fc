"""The HTTP side every function shares: the one place errors become OpenAI envelopes, and dependencies."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.catalog import ModelCatalog
from shared.errors import FnserveError, InvalidRequestError, RequestTooLargeError

if TYPE_CHECKING:
    from shared.embeddings import EmbeddingModel
    from shared.generation.model import GenerationModel

log = logging.getLogger(__name__)


def error_response(error: FnserveError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> FnserveError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request: it is not valid JSON.")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return InvalidRequestError("The request body must be a JSON object (Content-Type: application/json).")
    param = _param(loc)
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "missing":
        return InvalidRequestError(
            f"Missing required parameter: {param!r}.", param=param, code="missing_required_parameter"
        )
    return InvalidRequestError(f"Invalid value for {param!r}: {message}." if param else message, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: list[Any]) -> str | None:
    """A validation error's location as OpenAI writes it (messages[0].content), without pydantic's union tags."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.lower() in _TYPE_TAGS or not part.isidentifier() or part[0].isupper():
            continue  # "str", "list[int]", "function-after[...]", "TextContentPart": which union branch failed
        else:
            param += f".{part}" if param else part
    return param or None


def install_error_handlers(app: FastAPI) -> None:
    """Turn every error into OpenAI's envelope: domain errors, validation, unknown routes, and bugs."""

    @app.exception_handler(FnserveError)
    async def _fnserve(request: Request, exc: FnserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = FnserveError(str(exc.detail), code=None)
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            error.message = f"Unknown request URL: {request.method} {request.url.path}."
            error.code = "unknown_url"
        return error_response(error)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(FnserveError("The server had an error while processing your request."))


def get_catalog(request: Request) -> ModelCatalog:
    catalog: ModelCatalog = request.app.state.catalog
    return catalog


CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]


async def generation_model(catalog: ModelCatalog, name: str) -> GenerationModel:
    """Resolve and (on first use) load a generation model, off the event loop."""
    catalog.resolve(name, "generate")  # unknown models fail fast, without a thread hop
    return await asyncio.to_thread(catalog.generation, name)


async def embedding_model(catalog: ModelCatalog, name: str) -> EmbeddingModel:
    catalog.resolve(name, "embedding")
    return await asyncio.to_thread(catalog.embedding, name)


async def sse_frames(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[dict[str, Any]]:
    """SSE `data:` frames for a stream of chunks, then [DONE]; an error mid-stream becomes an error frame."""
    try:
        async for chunk in chunks:
            yield {"data": chunk.model_dump_json(exclude_none=False)}
    except FnserveError as exc:
        yield {"data": json.dumps(exc.to_dict())}
        return
    except Exception:
        log.exception("stream failed")
        yield {"data": json.dumps(FnserveError("The server had an error while streaming.").to_dict())}
        return
    yield {"data": "[DONE]"}


class BodySizeLimit:
    """ASGI middleware: a request body over max_bytes gets 413 in the error envelope, read or declared."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = self._too_large() if declared.isdigit() else InvalidRequestError("invalid Content-Length header")
            await error_response(error)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # turned into the envelope by the app's handler
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"request body is larger than the limit of {self.max_bytes} bytes")
