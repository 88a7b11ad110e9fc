"""/v1/sessions: conversations kept in the session store (create, list, get, rename, rollback, export, delete),
and the paths other servers use for them (/sessions, /chat/history/{id})."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field, StrictInt, StrictStr

from shared.asgi import create_app, lambda_handler
from shared.errors import InvalidRequestError
from shared.protocol.common import OpenAIModel
from shared.serving.sessions import export_markdown, listing, owner_of, session_or_404, store_of

router = APIRouter(tags=["sessions"])
MAX_PAGE = 100


class SessionCreate(OpenAIModel):
    title: StrictStr = Field(default="", max_length=200)
    settings: dict[str, Any] = Field(default_factory=dict, description="the chat settings this session uses")


class SessionRename(OpenAIModel):
    title: StrictStr = Field(max_length=200)


class Rollback(OpenAIModel):
    amount: StrictInt = Field(default=1, ge=1, description="how many of the last messages to remove")


@router.post("/v1/sessions")
@router.post("/sessions", include_in_schema=False)
async def create_session(http: Request, body: SessionCreate | None = None) -> dict[str, Any]:
    """Create an empty session."""
    body = body or SessionCreate()
    session = await (await store_of(http)).create(owner_of(http), body.title, body.settings)
    return session.to_dict()


@router.get("/v1/sessions")
@router.get("/sessions", include_in_schema=False)
async def list_sessions(
    http: Request, limit: int = Query(default=20, ge=1, le=MAX_PAGE), before: float | None = None
) -> dict[str, Any]:
    """This key's sessions, most recently changed first; page with `before` = the previous page's `next_before`."""
    sessions = await (await store_of(http)).recent(owner_of(http), limit + 1, before)
    return listing(sessions, limit)


@router.get("/v1/sessions/{session_id}")
@router.get("/chat/history/{session_id}", include_in_schema=False)
async def get_session(session_id: str, http: Request) -> dict[str, Any]:
    """A session with its messages."""
    _, _, session = await session_or_404(http, session_id)
    return session.to_dict()


@router.patch("/v1/sessions/{session_id}")
@router.post("/v1/sessions/{session_id}/rename", include_in_schema=False)
async def rename_session(session_id: str, body: SessionRename, http: Request) -> dict[str, Any]:
    """Change a session's title."""
    store, owner, _ = await session_or_404(http, session_id)
    session = await store.rename(owner, session_id, body.title)
    if session is None:
        _, _, session = await session_or_404(http, session_id)  # deleted meanwhile: 404
    return session.to_dict()


@router.post("/v1/sessions/{session_id}/rollback")
@router.post("/chat/history/{session_id}/rollback", include_in_schema=False)
async def rollback_session(session_id: str, http: Request, body: Rollback | None = None) -> dict[str, Any]:
    """Remove the last `amount` messages."""
    store, owner, _ = await session_or_404(http, session_id)
    session = await store.rollback(owner, session_id, (body or Rollback()).amount)
    if session is None:
        _, _, session = await session_or_404(http, session_id)
    return session.to_dict()


@router.get("/v1/sessions/{session_id}/export", response_model=None)
async def export_session(
    session_id: str, http: Request, format: Literal["json", "markdown"] = "json"
) -> dict[str, Any] | PlainTextResponse:
    """The session as JSON, or as Markdown."""
    _, _, session = await session_or_404(http, session_id)
    if format == "markdown":
        return PlainTextResponse(export_markdown(session), media_type="text/markdown; charset=utf-8")
    return session.to_dict()


@router.delete("/v1/sessions/{session_id}")
@router.delete("/chat/history/{session_id}", include_in_schema=False)
async def delete_session(session_id: str, http: Request) -> dict[str, Any]:
    """Delete a session and its messages."""
    store, owner, _ = await session_or_404(http, session_id)
    if not await store.delete(owner, session_id):
        raise InvalidRequestError(f"session {session_id!r} was deleted meanwhile", param="session_id")
    return {"id": session_id, "object": "session.deleted", "deleted": True}


app = create_app(router, title="fnserve sessions")
handler = lambda_handler(app)
