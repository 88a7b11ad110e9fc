"""Sessions in Redis (the server the rate limits use): a hash and a message list per session, a sorted set of
each owner's sessions by last update; changes that must be atomic are Lua scripts, run whole by the server."""

from __future__ import annotations

import json
import time
from typing import Any

from redis.asyncio import Redis

from shared.sessions.store import Message, Session, SessionConflictError, new_session

PREFIX = "fnserve:session:"

# KEYS: hash, list, owner's set. ARGV: owner, expected version, now, ttl, title, id, messages...
APPEND = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[2] then return -2 end
for i = 7, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'title') == '' then redis.call('HSET', KEYS[1], 'title', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[6])
return 1
"""
# KEYS: hash, list, owner's set. ARGV: owner, amount, now, id.
ROLLBACK = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
local n = redis.call('LLEN', KEYS[2])
local keep = n - tonumber(ARGV[2])
if keep <= 0 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, keep - 1) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""


class RedisStore:
    def __init__(self, url: str, ttl: float, max_sessions: int) -> None:
        self.redis = Redis.from_url(url, decode_responses=True)
        self.ttl = int(ttl)
        self.max_sessions = max_sessions
        self._append = self.redis.register_script(APPEND)
        self._rollback = self.redis.register_script(ROLLBACK)

    def _keys(self, session_id: str, owner: str) -> list[str]:
        return [PREFIX + session_id, PREFIX + session_id + ":messages", f"fnserve:sessions:{owner}"]

    async def _load(self, owner: str, session_id: str, messages: bool = True) -> Session | None:
        fields = await self.redis.hgetall(PREFIX + session_id)
        if not fields or fields.get("owner") != owner:
            return None
        session = Session(
            session_id,
            owner,
            str(fields["title"]),
            float(fields["created"]),
            float(fields["updated"]),
            int(fields["version"]),
            json.loads(fields["settings"]),
        )
        if messages:
            bodies = await self.redis.lrange(PREFIX + session_id + ":messages", 0, -1)
            session.messages = [Message.from_dict(json.loads(b)) for b in bodies]
        return session

    async def create(self, owner: str, title: str, settings: dict[str, Any]) -> Session:
        session = new_session(owner, title, settings)
        hash_key, _, owned = self._keys(session.id, owner)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                hash_key,
                mapping={
                    "owner": owner,
                    "title": title,
                    "created": session.created,
                    "updated": session.updated,
                    "version": 0,
                    "settings": json.dumps(settings),
                },
            )
            pipe.expire(hash_key, self.ttl)
            pipe.zadd(owned, {session.id: session.updated})
            pipe.zremrangebyscore(owned, "-inf", time.time() - self.ttl)  # expired: their keys are gone already
            await pipe.execute()
        excess = await self.redis.zcard(owned) - self.max_sessions
        if excess > 0:  # the owner's sessions updated longest ago go first
            for old in await self.redis.zrange(owned, 0, excess - 1):
                await self.delete(owner, str(old))
        return session

    async def get(self, owner: str, session_id: str) -> Session | None:
        return await self._load(owner, session_id)

    async def recent(self, owner: str, limit: int, before: float | None) -> list[Session]:
        owned = f"fnserve:sessions:{owner}"
        top = f"({before}" if before is not None else "+inf"
        ids = await self.redis.zrevrangebyscore(owned, top, time.time() - self.ttl, start=0, num=limit)
        out = []
        for found in ids:
            session_id = str(found)
            session = await self._load(owner, session_id, messages=False)
            if session is not None:
                count = await self.redis.llen(PREFIX + session_id + ":messages")
                session.messages = [Message("", None)] * count
                out.append(session)
        return out

    async def delete(self, owner: str, session_id: str) -> bool:
        if await self._load(owner, session_id, messages=False) is None:
            return False
        hash_key, messages, owned = self._keys(session_id, owner)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(hash_key, messages)
            pipe.zrem(owned, session_id)
            await pipe.execute()
        return True

    async def rename(self, owner: str, session_id: str, title: str) -> Session | None:
        if await self._load(owner, session_id, messages=False) is None:
            return None
        await self.redis.hset(PREFIX + session_id, mapping={"title": title, "updated": time.time()})
        return await self._load(owner, session_id)

    async def append(
        self, owner: str, session_id: str, messages: list[Message], expected: int, title: str | None = None
    ) -> Session:
        args: list[str | int | float] = [owner, expected, time.time(), self.ttl, title or "", session_id]
        done = await self._append(
            keys=self._keys(session_id, owner), args=[*args, *(json.dumps(m.to_dict()) for m in messages)]
        )
        if done == -1:
            raise SessionConflictError(f"session {session_id!r} was deleted or expired during this turn")
        if done == -2:
            raise SessionConflictError(f"session {session_id!r} changed during this turn; send the turn again")
        session = await self._load(owner, session_id)
        assert session is not None
        return session

    async def rollback(self, owner: str, session_id: str, amount: int) -> Session | None:
        done = await self._rollback(keys=self._keys(session_id, owner), args=[owner, amount, time.time(), session_id])
        return None if done == -1 else await self._load(owner, session_id)

    async def close(self) -> None:
        await self.redis.aclose()
