"""Sessions on the request path: the store an app uses, who owns a session, and a chat turn on a session (its
history before the new messages, trimmed to the context; the turn's messages committed when the reply is whole)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection

from shared.errors import InvalidRequestError, NotFoundError
from shared.protocol.chat import ChatMessage, ToolCall
from shared.sessions.store import Message, Session, SessionStore, open_store
from shared.settings import Settings

_opening = threading.Lock()  # a thread lock, not an asyncio one: apps may run on several event loops
TITLE_CHARS = 60


async def store_of(connection: HTTPConnection) -> SessionStore:
    """The app's session store, opened on first use (a function that never touches sessions opens nothing)."""
    state = connection.app.state

    def opened() -> SessionStore:
        with _opening:
            if getattr(state, "sessions", None) is None:
                settings: Settings = state.settings
                state.sessions = open_store(settings)
            store: SessionStore = state.sessions
            return store

    existing: SessionStore | None = getattr(state, "sessions", None)
    return existing if existing is not None else await asyncio.to_thread(opened)


def owner_of(connection: HTTPConnection) -> str:
    """Sessions belong to the API key's name; with keys off, to everyone alike ("")."""
    from shared.guards.access import request_context

    return request_context(connection).key_name or ""


async def session_or_404(connection: HTTPConnection, session_id: str) -> tuple[SessionStore, str, Session]:
    store, owner = await store_of(connection), owner_of(connection)
    session = await store.get(owner, session_id)
    if session is None:
        raise NotFoundError(f"No session {session_id!r}", param="session_id", code="session_not_found")
    return store, owner, session


def as_chat(message: Message) -> ChatMessage:
    return ChatMessage.model_validate(
        {
            "role": message.role,
            "content": message.content,
            "tool_calls": message.tool_calls,
            "tool_call_id": message.tool_call_id,
        }
    )


def as_stored(message: ChatMessage, tokens: int = 0) -> Message:
    return Message(
        role=message.role,
        content=message.text() if message.content is not None else None,
        tokens=tokens,
        tool_calls=[c.model_dump() for c in message.tool_calls] if message.tool_calls else None,
        tool_call_id=message.tool_call_id,
    )


@dataclass
class Turn:
    """One chat request on a session: what it read, and what it will add."""

    store: SessionStore
    owner: str
    session: Session
    new: list[ChatMessage]

    def history(self) -> list[ChatMessage]:
        return [as_chat(m) for m in self.session.messages]

    async def commit(self, content: str | None, calls: list[ToolCall] | None, prompt: int, completion: int) -> None:
        """Add the turn's messages and the reply, if the session is still as this turn read it (else 409)."""
        added = [as_stored(m) for m in self.new]
        if added:
            added[-1].tokens = prompt
        reply = Message("assistant", content, tokens=completion)
        if calls:
            reply.tool_calls = [c.model_dump() for c in calls]
        first_user = next((m.text() for m in self.new if m.role == "user"), "")
        title = first_user[:TITLE_CHARS].strip() if not self.session.title else None
        await self.store.append(self.owner, self.session.id, [*added, reply], self.session.version, title or None)


async def begin_turn(connection: HTTPConnection, session_id: str, messages: list[ChatMessage], n: int) -> Turn:
    if n != 1:
        raise InvalidRequestError("a turn on a session takes n = 1 (one reply to keep)", param="n")
    store, owner, session = await session_or_404(connection, session_id)
    return Turn(store, owner, session, messages)


def trimmed(
    history: list[ChatMessage], new: list[ChatMessage], fits: Callable[[list[ChatMessage]], bool]
) -> list[ChatMessage]:
    """History and the new messages, the oldest turns of the history left out until `fits`; system messages are
    kept. The new messages are never left out (a turn too long alone fails as any prompt would)."""
    kept = list(history)
    while kept and not fits(kept + new):
        drop = next((i for i, m in enumerate(kept) if m.role not in ("system", "developer")), None)
        if drop is None:
            break
        del kept[drop]
        # a tool result is meaningless without the call before it: drop those that lost it
        while drop < len(kept) and kept[drop].role == "tool":
            del kept[drop]
    return kept + new


def export_markdown(session: Session) -> str:
    lines = [f"# {session.title or session.id}", ""]
    for m in session.messages:
        lines.append(f"**{m.role}**")
        lines.append("")
        if m.content:
            lines.append(m.content)
        for call in m.tool_calls or []:
            function = call.get("function", {})
            lines.append(f"`{function.get('name')}({function.get('arguments')})`")
        lines.append("")
    return "\n".join(lines)


def listing(sessions: list[Session], limit: int) -> dict[str, Any]:
    data = [s.to_dict(messages=False) for s in sessions[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": len(sessions) > limit,
        "next_before": sessions[limit - 1].updated if len(sessions) > limit else None,
    }
