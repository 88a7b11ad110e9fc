"""The session store's contract, against each real store: SQLite (a file), Redis (a real redis-server) and
DynamoDB (moto in server mode)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.sessions.store import Message, SessionConflictError, SessionStore, open_store
from shared.settings import Settings

KINDS = ["sqlite", "redis", "dynamodb"]


def store_url(kind: str, tmp_path: Path, redis_url: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.db'}"
    if kind == "redis":
        return redis_url.rsplit("/", 1)[0] + f"/{1 + KINDS.index(kind)}"
    from shared.sessions.dynamodb import create_table

    table = f"sessions-{uuid.uuid4().hex[:8]}"
    create_table(table)
    return f"dynamodb://{table}"


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, aws_env: dict[str, str]) -> Iterator[str]:
    made = store_url(request.param, tmp_path, redis_url)
    if request.param == "redis":
        import redis

        redis.Redis.from_url(made).flushdb()
    yield made


def store(url: str, ttl: float = 3600, max_sessions: int = 100) -> SessionStore:
    return open_store(Settings(preload=[], session_store=url, session_ttl=ttl, max_sessions=max_sessions))


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_create_append_get_list_rename_rollback_delete(url: str) -> None:
    async def scenario() -> None:
        s = store(url)
        created = await s.create("alice", "", {"temperature": 0.5})
        assert created.id.startswith("sess_") and created.version == 0
        turn = [Message("user", "hi", tokens=3), Message("assistant", "hello", tokens=2)]
        after = await s.append("alice", created.id, turn, expected=0, title="hi")
        assert after.version == 1 and after.title == "hi"
        assert [(m.role, m.content, m.tokens) for m in after.messages] == [("user", "hi", 3), ("assistant", "hello", 2)]
        calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        await s.append("alice", created.id, [Message("assistant", None, tool_calls=calls)], expected=1)
        got = await s.get("alice", created.id)
        assert got is not None and got.messages[-1].tool_calls == calls and got.settings == {"temperature": 0.5}
        with pytest.raises(SessionConflictError):  # a turn that read version 1 commits nothing now
            await s.append("alice", created.id, [Message("user", "late")], expected=1)
        assert await s.get("bob", created.id) is None  # another owner's session reads as missing
        assert not await s.delete("bob", created.id)
        second = await s.create("alice", "second", {})
        listed = await s.recent("alice", 10, None)
        assert [x.id for x in listed] == [second.id, created.id]
        assert len(listed[1].messages) == 3  # the count
        assert [x.id for x in await s.recent("alice", 1, None)] == [second.id]
        assert [x.id for x in await s.recent("alice", 10, listed[0].updated)] == [created.id]  # the next page
        assert await s.recent("bob", 10, None) == []
        renamed = await s.rename("alice", created.id, "greeting")
        assert renamed is not None and renamed.title == "greeting"
        rolled = await s.rollback("alice", created.id, 2)
        assert rolled is not None and [m.content for m in rolled.messages] == ["hi"]
        assert (await s.rollback("alice", created.id, 5)).messages == []  # type: ignore[union-attr]
        assert await s.delete("alice", created.id)
        assert await s.get("alice", created.id) is None
        await s.close()

    run(scenario())


def test_sessions_expire_after_the_ttl(url: str) -> None:
    async def scenario() -> None:
        s = store(url, ttl=1)
        session = await s.create("alice", "", {})
        assert await s.get("alice", session.id) is not None
        await asyncio.sleep(2.1)
        assert await s.get("alice", session.id) is None
        assert await s.recent("alice", 10, None) == []
        await s.close()

    run(scenario())


def test_past_max_sessions_the_oldest_go_first(url: str) -> None:
    async def scenario() -> None:
        s = store(url, max_sessions=2)
        first = await s.create("alice", "1", {})
        await asyncio.sleep(0.01)
        second = await s.create("alice", "2", {})
        await asyncio.sleep(0.01)
        await s.append("alice", first.id, [Message("user", "keep me")], expected=0)  # now the newest
        await asyncio.sleep(0.01)
        third = await s.create("alice", "3", {})
        other = await s.create("bob", "b", {})  # another owner's bound is its own
        ids = {x.id for x in await s.recent("alice", 10, None)}
        assert ids == {first.id, third.id} and second.id not in ids
        assert await s.get("bob", other.id) is not None
        await s.close()

    run(scenario())


APPENDER = """
import asyncio, sys
from shared.sessions.store import Message, SessionConflictError, open_store
from shared.settings import Settings

async def main(url, session_id, who, n):
    s = open_store(Settings(preload=[], session_store=url))
    for i in range(n):
        while True:
            current = await s.get("alice", session_id)
            try:
                await s.append("alice", session_id, [Message("user", f"{who}-{i}")], expected=current.version)
                break
            except SessionConflictError:
                continue
    await s.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def test_two_processes_appending_at_once_lose_nothing(url: str, tmp_path: Path) -> None:
    session = run(store(url).create("alice", "", {}))
    script = tmp_path / "append.py"
    script.write_text(APPENDER)
    n = 15
    procs = [
        subprocess.Popen([sys.executable, str(script), url, session.id, who, str(n)])  # type: ignore[attr-defined]
        for who in ("a", "b")
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    final = run(store(url).get("alice", session.id))  # type: ignore[attr-defined]
    contents = [m.content for m in final.messages]  # type: ignore[attr-defined]
    assert sorted(contents) == sorted(f"{who}-{i}" for who in "ab" for i in range(n))
    for who in "ab":  # each process's own turns in its order
        assert [c for c in contents if c.startswith(who)] == [f"{who}-{i}" for i in range(n)]
    assert final.version == 2 * n  # type: ignore[attr-defined]


def test_messages_round_trip_as_json() -> None:
    m = Message("tool", "42", created=time.time(), tokens=1, tool_call_id="call_1")
    assert Message.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_the_default_store_follows_the_rate_limits_redis(redis_url: str, tmp_path: Path) -> None:
    from shared.sessions.redis import RedisStore
    from shared.sessions.sqlite import SQLiteStore

    assert isinstance(open_store(Settings(preload=[], rate_limit_storage=redis_url)), RedisStore)
    local = open_store(Settings(preload=[], cache_dir=tmp_path))
    assert isinstance(local, SQLiteStore) and local.path == tmp_path / "sessions.db"
