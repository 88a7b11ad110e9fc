"""Sessions in one SQLite file: WAL, so several worker processes read while one writes; every change is one
transaction (a crash mid-turn leaves the file as it was before that turn)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from shared.sessions.store import Message, Session, SessionConflictError, new_session

T = TypeVar("T")

# Migrations by PRAGMA user_version: entry i takes the schema from version i to i + 1.
MIGRATIONS = [
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL, created REAL NOT NULL,
        updated REAL NOT NULL, version INTEGER NOT NULL, settings TEXT NOT NULL
    );
    CREATE INDEX sessions_owner_updated ON sessions (owner, updated);
    CREATE INDEX sessions_updated ON sessions (updated);
    CREATE TABLE messages (
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE, seq INTEGER NOT NULL,
        body TEXT NOT NULL, PRIMARY KEY (session_id, seq)
    );
    """,
]


class SQLiteStore:
    def __init__(self, path: str, ttl: float, max_sessions: int) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for i, script in enumerate(MIGRATIONS[version:], start=version):
                db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {i + 1}; COMMIT;")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)  # transactions are explicit
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a process crash loses nothing committed
        return db

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result
            finally:
                db.close()

        return await asyncio.to_thread(run)

    def _alive(self) -> float:
        return time.time() - self.ttl

    def _load(self, db: sqlite3.Connection, owner: str, session_id: str, messages: bool = True) -> Session | None:
        row = db.execute(
            "SELECT id, owner, title, created, updated, version, settings FROM sessions "
            "WHERE id = ? AND owner = ? AND updated >= ?",
            (session_id, owner, self._alive()),
        ).fetchone()
        if row is None:
            return None
        session = Session(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]))
        if messages:
            bodies = db.execute("SELECT body FROM messages WHERE session_id = ? ORDER BY seq", (session_id,))
            session.messages = [Message.from_dict(json.loads(b)) for (b,) in bodies]
        return session

    async def create(self, owner: str, title: str, settings: dict[str, Any]) -> Session:
        session = new_session(owner, title, settings)

        def work(db: sqlite3.Connection) -> Session:
            db.execute("DELETE FROM sessions WHERE updated < ?", (self._alive(),))
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session.id, owner, title, session.created, session.updated, 0, json.dumps(settings)),
            )
            # Past the owner's bound, its sessions updated longest ago go first.
            db.execute(
                "DELETE FROM sessions WHERE id IN "
                "(SELECT id FROM sessions WHERE owner = ? ORDER BY updated DESC LIMIT -1 OFFSET ?)",
                (owner, self.max_sessions),
            )
            return session

        return await self._run(work)

    async def get(self, owner: str, session_id: str) -> Session | None:
        return await self._run(lambda db: self._load(db, owner, session_id))

    async def recent(self, owner: str, limit: int, before: float | None) -> list[Session]:
        def work(db: sqlite3.Connection) -> list[Session]:
            rows = db.execute(
                "SELECT s.id, s.owner, s.title, s.created, s.updated, s.version, s.settings, "
                "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) FROM sessions s "
                "WHERE owner = ? AND updated >= ? AND updated < ? ORDER BY updated DESC LIMIT ?",
                (owner, self._alive(), before if before is not None else float("inf"), limit),
            ).fetchall()
            out = []
            for r in rows:
                session = Session(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))
                session.messages = [Message("", None)] * int(r[7])  # the count only
                out.append(session)
            return out

        return await self._run(work)

    async def delete(self, owner: str, session_id: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)).rowcount > 0

        return await self._run(work)

    async def rename(self, owner: str, session_id: str, title: str) -> Session | None:
        def work(db: sqlite3.Connection) -> Session | None:
            if self._load(db, owner, session_id, messages=False) is None:
                return None
            db.execute("UPDATE sessions SET title = ?, updated = ? WHERE id = ?", (title, time.time(), session_id))
            return self._load(db, owner, session_id)

        return await self._run(work)

    async def append(
        self, owner: str, session_id: str, messages: list[Message], expected: int, title: str | None = None
    ) -> Session:
        def work(db: sqlite3.Connection) -> Session:
            session = self._load(db, owner, session_id, messages=False)
            if session is None:
                raise SessionConflictError(f"session {session_id!r} was deleted or expired during this turn")
            if session.version != expected:
                raise SessionConflictError(f"session {session_id!r} changed during this turn; send the turn again")
            start = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE session_id = ?", (session_id,))
            first = start.fetchone()[0]
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?)",
                [(session_id, first + i, json.dumps(m.to_dict())) for i, m in enumerate(messages)],
            )
            db.execute(
                "UPDATE sessions SET version = version + 1, updated = ?, "
                "title = CASE WHEN title = '' AND ? IS NOT NULL THEN ? ELSE title END WHERE id = ?",
                (time.time(), title, title, session_id),
            )
            loaded = self._load(db, owner, session_id)
            assert loaded is not None
            return loaded

        return await self._run(work)

    async def rollback(self, owner: str, session_id: str, amount: int) -> Session | None:
        def work(db: sqlite3.Connection) -> Session | None:
            if self._load(db, owner, session_id, messages=False) is None:
                return None
            db.execute(
                "DELETE FROM messages WHERE session_id = ? AND seq IN "
                "(SELECT seq FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?)",
                (session_id, session_id, amount),
            )
            db.execute("UPDATE sessions SET version = version + 1, updated = ? WHERE id = ?", (time.time(), session_id))
            return self._load(db, owner, session_id)

        return await self._run(work)

    async def close(self) -> None:
        return None
