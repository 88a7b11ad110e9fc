"""Sessions in DynamoDB, for deployments on AWS Lambda: one item per session (its messages a list attribute,
so a session is bounded by DynamoDB's 400 KB item size), a global index by owner and last update for listing,
and DynamoDB's TTL on `expires`. Appends are conditional writes on the version read."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
from botocore.exceptions import ClientError

from shared.sessions.store import Message, Session, SessionConflictError, new_session

T = TypeVar("T")
OWNER_INDEX = "owner-updated"


def create_table(name: str, client: Any = None) -> None:
    """The table this store expects (the deploy stack makes the same): for local use and tests."""
    client = client or boto3.client("dynamodb")
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "id", "AttributeType": "S"},
            {"AttributeName": "owner", "AttributeType": "S"},
            {"AttributeName": "updated", "AttributeType": "N"},
        ],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        GlobalSecondaryIndexes=[
            {
                "IndexName": OWNER_INDEX,
                "KeySchema": [
                    {"AttributeName": "owner", "KeyType": "HASH"},
                    {"AttributeName": "updated", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )
    client.get_waiter("table_exists").wait(TableName=name)
    client.update_time_to_live(TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires"})


class DynamoDBStore:
    def __init__(self, table: str, ttl: float, max_sessions: int) -> None:
        self.name = table
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._local = threading.local()

    @property
    def table(self) -> Any:
        """This thread's Table: boto3 resources are not safe to share between threads (its clients are)."""
        if getattr(self._local, "table", None) is None:
            self._local.table = boto3.resource("dynamodb").Table(self.name)
        return self._local.table

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.to_thread(work)

    def _session(self, item: dict[str, Any], messages: bool = True) -> Session:
        session = Session(
            str(item["id"]),
            str(item["owner"]),
            str(item["title"]),
            float(item["created"]),
            float(item["updated"]),
            int(item["version"]),
            json.loads(str(item["settings"])),
        )
        bodies = item.get("messages", [])
        session.messages = (
            [Message.from_dict(json.loads(b)) for b in bodies] if messages else [Message("", None)] * len(bodies)
        )
        return session

    def _item(self, owner: str, session_id: str) -> dict[str, Any] | None:
        item = self.table.get_item(Key={"id": session_id}, ConsistentRead=True).get("Item")
        # DynamoDB deletes expired items within days, not at once: expired reads as missing here.
        if item is None or item["owner"] != owner or float(item["updated"]) < time.time() - self.ttl:
            return None
        return item

    async def create(self, owner: str, title: str, settings: dict[str, Any]) -> Session:
        session = new_session(owner, title, settings)

        def work() -> Session:
            self.table.put_item(
                Item={
                    "id": session.id,
                    "owner": owner,
                    "title": title,
                    "created": _n(session.created),
                    "updated": _n(session.updated),
                    "expires": int(session.updated + self.ttl),
                    "version": 0,
                    "settings": json.dumps(settings),
                    "messages": [],
                }
            )
            owned = self._owned(owner, None, self.max_sessions + 64)
            for item in owned[self.max_sessions :]:  # the owner's sessions updated longest ago go first
                self.table.delete_item(Key={"id": item["id"]})
            return session

        return await self._run(work)

    def _owned(self, owner: str, before: float | None, limit: int) -> list[dict[str, Any]]:
        condition = "#o = :o AND #u < :b"
        values: dict[str, Any] = {":o": owner, ":b": _n(before if before is not None else 1e18)}
        found = self.table.query(
            IndexName=OWNER_INDEX,
            KeyConditionExpression=condition,
            ExpressionAttributeNames={"#o": "owner", "#u": "updated"},
            ExpressionAttributeValues=values,
            ScanIndexForward=False,
            Limit=limit,
        )
        alive = time.time() - self.ttl
        return [i for i in found.get("Items", []) if float(i["updated"]) >= alive]

    async def get(self, owner: str, session_id: str) -> Session | None:
        item = await self._run(lambda: self._item(owner, session_id))
        return self._session(item) if item else None

    async def recent(self, owner: str, limit: int, before: float | None) -> list[Session]:
        items = await self._run(lambda: self._owned(owner, before, limit))
        return [self._session(i, messages=False) for i in items]

    async def delete(self, owner: str, session_id: str) -> bool:
        def work() -> bool:
            try:
                self.table.delete_item(
                    Key={"id": session_id},
                    ConditionExpression="#o = :o",
                    ExpressionAttributeNames={"#o": "owner"},
                    ExpressionAttributeValues={":o": owner},
                )
            except ClientError as exc:
                if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                    return False
                raise
            return True

        return await self._run(work)

    async def rename(self, owner: str, session_id: str, title: str) -> Session | None:
        def work() -> Session | None:
            if self._item(owner, session_id) is None:
                return None
            now = time.time()
            self.table.update_item(
                Key={"id": session_id},
                UpdateExpression="SET title = :t, #u = :u, expires = :e",
                ExpressionAttributeNames={"#u": "updated"},
                ExpressionAttributeValues={":t": title, ":u": _n(now), ":e": int(now + self.ttl)},
            )
            item = self._item(owner, session_id)
            return self._session(item) if item else None

        return await self._run(work)

    async def append(
        self, owner: str, session_id: str, messages: list[Message], expected: int, title: str | None = None
    ) -> Session:
        def work() -> Session:
            now = time.time()
            update = "SET messages = list_append(messages, :m), version = version + :one, #u = :u, expires = :e"
            values: dict[str, Any] = {
                ":m": [json.dumps(m.to_dict()) for m in messages],
                ":one": 1,
                ":u": _n(now),
                ":e": int(now + self.ttl),
                ":o": owner,
                ":v": expected,
                ":empty": "",
            }
            if title:
                update += ", title = :t"
                values[":t"] = title
                condition = "#o = :o AND version = :v AND title = :empty"
                try:
                    return self._update(session_id, update, condition, values)
                except SessionConflictError:
                    item = self._item(owner, session_id)
                    if item is None or int(item["version"]) != expected:
                        raise
                    update = update.removesuffix(", title = :t")  # titled meanwhile: keep that title
                    del values[":t"]
            return self._update(session_id, update, "#o = :o AND version = :v", values)

        return await self._run(work)

    def _update(self, session_id: str, update: str, condition: str, values: dict[str, Any]) -> Session:
        try:
            result = self.table.update_item(
                Key={"id": session_id},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={"#u": "updated", "#o": "owner"},
                ExpressionAttributeValues={k: v for k, v in values.items() if k in update or k in condition},
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise SessionConflictError(
                    f"session {session_id!r} changed, or was deleted, during this turn; send the turn again"
                ) from None
            raise
        return self._session(result["Attributes"])

    async def rollback(self, owner: str, session_id: str, amount: int) -> Session | None:
        def work() -> Session | None:
            while True:
                item = self._item(owner, session_id)
                if item is None:
                    return None
                kept = list(item.get("messages", []))[: max(0, len(item.get("messages", [])) - amount)]
                now = time.time()
                try:
                    return self._update(
                        session_id,
                        "SET messages = :m, version = version + :one, #u = :u, expires = :e",
                        "#o = :o AND version = :v",
                        {
                            ":m": kept,
                            ":one": 1,
                            ":u": _n(now),
                            ":e": int(now + self.ttl),
                            ":o": owner,
                            ":v": int(item["version"]),
                        },
                    )
                except SessionConflictError:
                    continue  # a turn committed in between: roll back from the new state

        return await self._run(work)

    async def close(self) -> None:
        return None


def _n(value: float) -> Any:
    """A number DynamoDB takes (boto3 wants Decimal, never float)."""
    from decimal import Decimal

    return Decimal(str(round(value, 6)))
