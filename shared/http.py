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
from starlette.requests import HTTPConnection

from shared.catalog import ModelCatalog
from shared.errors import FnserveError, InvalidRequestError, RequestTooLargeError

if TYPE_CHECKING:
    from shared.embeddings import EmbeddingModel
    from shared.generation.model import GenerationModel

log = logging.getLogger(__name__)


def error_response(error: FnserveError, request_id: str | None = None) -> JSONResponse:
    return JSONResponse(error.to_dict(request_id), status_code=error.status_code, headers=error.headers)


def _request_id(request: Request) -> str | None:
    ctx = getattr(request.state, "fnserve", None)
    return getattr(ctx, "request_id", None)


def _validation_error(exc: RequestValidationError) -> FnserveError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request: it is not valid JSON.")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return InvalidRequestError("The request body must be a JSON object (Content-Type: application/json).")
    param = _param(loc)
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "value_error" and "error" in first.get("ctx", {}):  # our validators' own words
        message = str(first["ctx"]["error"])
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
        return error_response(exc, _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc), _request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = FnserveError(str(exc.detail), code=None)
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            error.message = f"Unknown request URL: {request.method} {request.url.path}."
            error.code = "unknown_url"
        elif exc.status_code == 413:  # the framework's body limit (FastAPI's max_body_size)
            limit = request.app.max_body_size
            error = RequestTooLargeError(f"request body is larger than the limit of {limit} bytes (max_body_bytes)")
        return error_response(error, _request_id(request))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = FnserveError("The server had an error while processing your request.")
        return error_response(error, _request_id(request))


def get_catalog(connection: HTTPConnection) -> ModelCatalog:
    catalog: ModelCatalog = connection.app.state.catalog
    return catalog


CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]


async def generation_model(catalog: ModelCatalog, name: str) -> GenerationModel:
    """Resolve and (on first use) load a generation model, off the event loop."""
    catalog.resolve(name, "generate")  # unknown models fail fast, without a thread hop
    return await asyncio.to_thread(catalog.generation, name)


async def embedding_model(catalog: ModelCatalog, name: str) -> EmbeddingModel:
    catalog.resolve(name, "embedding")
    return await asyncio.to_thread(catalog.embedding, name)


# Line breaks to Python's str.splitlines (and so to requests' iter_lines(decode_unicode=True)) that JSON leaves
# unescaped: a client reading a stream that way cut a `data:` line at a model's U+2028 and failed to parse it.
_UNICODE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


async def sse_frames(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[dict[str, Any]]:
    """SSE `data:` frames for a stream of chunks, then [DONE]; an error mid-stream becomes an error frame. The
    JSON escapes the Unicode line breaks too (the same JSON), so that every line reader keeps a frame whole."""
    try:
        async for chunk in chunks:
            yield {"data": chunk.model_dump_json(exclude_none=False).translate(_UNICODE_BREAKS)}
    except FnserveError as exc:
        yield {"data": json.dumps(exc.to_dict())}
        return
    except Exception:
        log.exception("stream failed")
        yield {"data": json.dumps(FnserveError("The server had an error while streaming.").to_dict())}
        return
    yield {"data": "[DONE]"}
