"""The session store's interface, its records, and the store the settings choose.

A session belongs to an owner (the API key's name; "" when keys are off) and holds its messages in order. A
turn reads the session, generates, then commits its messages only if the session is still at the version it
read (`append(..., expected=version)`): two turns on one session never interleave, the later one is refused
(409), and a turn that fails, is cancelled or dies with its process commits nothing. No lock is held while a
model generates, so a crash leaves nothing to clean up.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from shared.errors import FnserveError
from shared.settings import Settings


class SessionConflictError(FnserveError):
    status_code = 409
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="session_id", code="session_conflict")


@dataclass
class Message:
    role: str
    content: str | None
    created: float = field(default_factory=time.time)
    tokens: int = 0
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "content"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Message:
        return cls(
            role=str(d["role"]),
            content=d.get("content"),
            created=float(d.get("created", 0.0)),
            tokens=int(d.get("tokens", 0)),
            tool_calls=d.get("tool_calls"),
            tool_call_id=d.get("tool_call_id"),
        )


@dataclass
class Session:
    id: str
    owner: str
    title: str
    created: float
    updated: float
    version: int = 0  # messages changed this many times
    settings: dict[str, Any] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)

    def to_dict(self, messages: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "session",
            "title": self.title,
            "created": int(self.created),
            "updated": int(self.updated),
            "version": self.version,
            "settings": self.settings,
            "message_count": len(self.messages),
        }
        if messages:
            out["messages"] = [m.to_dict() for m in self.messages]
        return out


def new_session(owner: str, title: str, settings: dict[str, Any]) -> Session:
    now = time.time()
    return Session("sess_" + uuid.uuid4().hex, owner, title, now, now, 0, settings, [])


class SessionStore(Protocol):
    """Every method is scoped to an owner: another owner's session reads as missing."""

    async def create(self, owner: str, title: str, settings: dict[str, Any]) -> Session: ...

    async def get(self, owner: str, session_id: str) -> Session | None: ...

    async def recent(self, owner: str, limit: int, before: float | None) -> list[Session]:
        """Sessions by last update, newest first, updated before `before`; without their messages."""
        ...

    async def delete(self, owner: str, session_id: str) -> bool: ...

    async def rename(self, owner: str, session_id: str, title: str) -> Session | None: ...

    async def append(
        self, owner: str, session_id: str, messages: list[Message], expected: int, title: str | None = None
    ) -> Session:
        """Add messages atomically if the session is at version `expected` (else SessionConflictError); a title
        for a session that has none yet."""
        ...

    async def rollback(self, owner: str, session_id: str, amount: int) -> Session | None:
        """Remove the last `amount` messages."""
        ...

    async def close(self) -> None: ...


def open_store(settings: Settings) -> SessionStore:
    """The store `session_store` names: sqlite:///path, redis://... or dynamodb://table. Unset: the rate limits'
    Redis where they use one, else sessions.db in the cache folder."""
    url = settings.session_store
    if url is None:  # several instances share the rate limits' Redis: then they share sessions there too
        limits = settings.rate_limit_storage or ""
        url = (
            limits
            if limits.startswith(("redis://", "rediss://"))
            else f"sqlite:///{settings.cache_dir / 'sessions.db'}"
        )
    if url.startswith("sqlite://"):
        from shared.sessions.sqlite import SQLiteStore

        path = url.removeprefix("sqlite://")  # sqlite:///abs/path (a file URL), sqlite://relative/path
        return SQLiteStore(path[1:] if path.startswith("//") else path, settings.session_ttl, settings.max_sessions)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from shared.sessions.redis import RedisStore

        return RedisStore(url, settings.session_ttl, settings.max_sessions)
    if url.startswith("dynamodb://"):
        from shared.sessions.dynamodb import DynamoDBStore

        return DynamoDBStore(url.removeprefix("dynamodb://"), settings.session_ttl, settings.max_sessions)
    raise ValueError(f"session_store {url!r}: expected sqlite:///path, redis://host:port/db or dynamodb://table")
