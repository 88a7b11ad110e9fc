"""batch_embed end to end against moto in server mode: objects put in S3 notify SQS, the handler consumes the
received messages, vectors land under the output prefix, once per object version, failures isolated."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import numpy as np
import pytest

from functions import batch_embed
from shared.settings import get_settings

BUCKET = "docs"
VISIBILITY = 2  # seconds: a failed message is received again this soon
CONTEXT = type("Context", (), {"get_remaining_time_in_millis": staticmethod(lambda: 600_000)})()


@pytest.fixture
def pipeline(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A bucket whose ObjectCreated notifications go to a queue with a DLQ (2 receives), an idempotency table."""
    suffix = str(time.monotonic_ns())
    s3, sqs, dynamodb = boto3.client("s3"), boto3.client("sqs"), boto3.client("dynamodb")
    bucket = f"{BUCKET}-{suffix}"
    s3.create_bucket(Bucket=bucket)
    dlq = sqs.create_queue(QueueName=f"dlq-{suffix}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
    queue = sqs.create_queue(
        QueueName=f"jobs-{suffix}", Attributes={"VisibilityTimeout": str(VISIBILITY), "RedrivePolicy": redrive}
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "in/"}]}},  # as the stack does
                }
            ]
        },
    )
    # S3 sends a test event when a notification is configured: the handler takes it without doing anything.
    test_events = receive(sqs, queue)
    assert [json.loads(m["Body"])["Event"] for m in test_events] == ["s3:TestEvent"]
    assert batch_embed.handler(sqs_event(test_events), CONTEXT) == {"batchItemFailures": []}
    sqs.delete_message(QueueUrl=queue, ReceiptHandle=test_events[0]["ReceiptHandle"])
    table = f"idempotency-{suffix}"
    dynamodb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    monkeypatch.setenv("FNSERVE_BATCH_IDEMPOTENCY_TABLE", table)
    monkeypatch.setenv("FNSERVE_PRELOAD", "[]")
    get_settings.cache_clear()
    batch_embed._s3.cache_clear()
    batch_embed._idempotency_store.cache_clear()
    yield {"s3": s3, "sqs": sqs, "bucket": bucket, "queue": queue, "dlq": dlq}
    get_settings.cache_clear()
    batch_embed._s3.cache_clear()
    batch_embed._idempotency_store.cache_clear()


def receive(sqs: Any, queue: str) -> list[dict[str, Any]]:
    """Every message the queue has now, as Lambda's SQS event source would pass them."""
    messages: list[dict[str, Any]] = []
    for _ in range(5):
        got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not got:
            break
        messages += got
    return messages


def sqs_event(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {},
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:jobs",
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
    }


def run_lambda(sqs: Any, queue: str) -> tuple[list[str], int]:
    """Receive, invoke the handler, delete what succeeded (as the event source mapping does): failed ids, count."""
    messages = receive(sqs, queue)
    if not messages:
        return [], 0
    result = batch_embed.handler(sqs_event(messages), CONTEXT)
    failed = [f["itemIdentifier"] for f in result["batchItemFailures"]]
    for message in messages:
        if message["MessageId"] not in failed:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    return failed, len(messages)


def outputs(s3: Any, bucket: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="embeddings/").get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


async def test_objects_put_in_the_bucket_are_embedded_once_per_version(
    pipeline: dict[str, Any], client: httpx.AsyncClient
) -> None:
    s3, sqs, bucket, queue = pipeline["s3"], pipeline["sqs"], pipeline["bucket"], pipeline["queue"]
    docs = [{"id": f"d{i}", "text": f"Document number {i} about guitars.", "lang": "en"} for i in range(5)]
    jsonl = "".join(json.dumps(d) + "\n" for d in docs)
    s3.put_object(Bucket=bucket, Key="in/naïve café notes.jsonl", Body=jsonl.encode())  # spaces and unicode
    s3.put_object(Bucket=bucket, Key="in/plain+text.txt", Body=b"first line\nsecond line\n")
    s3.put_object(Bucket=bucket, Key="in/empty.txt", Body=b"")
    failed, received = run_lambda(sqs, queue)
    assert (received, failed) == (3, [])
    written = outputs(s3, bucket)
    manifests = {k: json.loads(v) for k, v in written.items() if k.endswith(".manifest.json")}
    assert {m["source"] for m in manifests.values()} == {
        "in/naïve café notes.jsonl",
        "in/plain+text.txt",
        "in/empty.txt",
    }
    by_source = {m["source"]: m for m in manifests.values()}
    assert by_source["in/empty.txt"]["documents"] == 0
    assert by_source["in/plain+text.txt"]["documents"] == 2
    rows = [
        json.loads(line)
        for line in written["embeddings/" + by_source["in/naïve café notes.jsonl"]["output"]].splitlines()
    ]
    assert [r["id"] for r in rows] == [d["id"] for d in docs] and all(r["lang"] == "en" for r in rows)
    assert all(len(r["embedding"]) == 384 for r in rows)
    api = await client.post("/v1/embeddings", json={"input": [d["text"] for d in docs]})
    expected = np.array([d["embedding"] for d in api.json()["data"]])
    assert np.allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-5)  # what /v1/embeddings gives

    # The same messages delivered again: nothing new is written.
    before = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="embeddings/")["Contents"]}
    notification = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": bucket},
                    "object": {
                        "key": "in/plain%2Btext.txt",
                        "eTag": s3.head_object(Bucket=bucket, Key="in/plain+text.txt")["ETag"].strip('"'),
                    },
                },
            }
        ]
    }
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(notification))
    leftover = receive(sqs, queue)
    assert len(leftover) == 1, [m["Body"][:200] for m in leftover]
    result = batch_embed.handler(sqs_event(leftover), CONTEXT)
    assert result["batchItemFailures"] == []
    sqs.delete_message(QueueUrl=queue, ReceiptHandle=leftover[0]["ReceiptHandle"])
    after = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="embeddings/")["Contents"]}
    assert after == before

    # An overwritten object (a new ETag) writes a new result beside the old one.
    s3.put_object(Bucket=bucket, Key="in/plain+text.txt", Body=b"first line\nsecond line\nthird line\n")
    assert run_lambda(sqs, queue)[0] == []
    results = [json.loads(v) for k, v in outputs(s3, bucket).items() if k.endswith(".manifest.json")]
    plain = sorted(m["documents"] for m in results if m["source"] == "in/plain+text.txt")
    assert plain == [2, 3]


def test_one_unreadable_object_fails_only_its_own_message_and_ends_in_the_dlq(pipeline: dict[str, Any]) -> None:
    s3, sqs, bucket, queue = pipeline["s3"], pipeline["sqs"], pipeline["bucket"], pipeline["queue"]
    s3.put_object(Bucket=bucket, Key="in/good.txt", Body=b"a good document\n")
    s3.put_object(Bucket=bucket, Key="in/binary.jsonl", Body=bytes(range(256)) * 64)  # no line is a document
    s3.put_object(Bucket=bucket, Key="in/also good.txt", Body=b"another good one\n")
    failed, received = run_lambda(sqs, queue)
    assert received == 3 and len(failed) == 1
    sources = {json.loads(v)["source"] for k, v in outputs(s3, bucket).items() if k.endswith(".manifest.json")}
    assert sources == {"in/good.txt", "in/also good.txt"}
    for _ in range(6):  # received again after the visibility timeout, until maxReceiveCount sends it on
        time.sleep(VISIBILITY + 0.1)
        run_lambda(sqs, queue)
    dead = receive(sqs, pipeline["dlq"])
    assert len(dead) == 1 and "binary.jsonl" in dead[0]["Body"]
    assert receive(sqs, queue) == []


def test_a_file_with_a_few_malformed_lines_completes_and_names_them(pipeline: dict[str, Any]) -> None:
    s3, sqs, bucket, queue = pipeline["s3"], pipeline["sqs"], pipeline["bucket"], pipeline["queue"]
    lines = [json.dumps({"id": i, "text": f"line {i}"}) for i in range(60)]
    lines[6] = "{broken"
    lines[41] = json.dumps({"id": 41})  # no text
    s3.put_object(Bucket=bucket, Key="in/mostly.jsonl", Body="\n".join(lines).encode())
    assert run_lambda(sqs, queue)[0] == []
    (manifest,) = [json.loads(v) for k, v in outputs(s3, bucket).items() if k.endswith(".manifest.json")]
    assert manifest["documents"] == 58 and manifest["bad_lines"] == 2
    assert manifest["bad_line_numbers"] == [7, 42] and "not JSON" in manifest["bad_line_reasons"][0]


def test_direct_s3_and_eventbridge_events_and_the_output_prefix(pipeline: dict[str, Any]) -> None:
    s3, bucket = pipeline["s3"], pipeline["bucket"]
    s3.put_object(Bucket=bucket, Key="direct.txt", Body=b"one\ntwo\n")
    etag = s3.head_object(Bucket=bucket, Key="direct.txt")["ETag"].strip('"')
    direct = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": bucket}, "object": {"key": "direct.txt", "eTag": etag}},
            }
        ]
    }
    assert batch_embed.handler(direct, CONTEXT) == {"objects": 1}
    bridge = {
        "detail-type": "Object Created",
        "source": "aws.s3",
        "detail": {
            "bucket": {"name": bucket},
            "object": {"key": "embeddings/direct.txt.x.embeddings.jsonl", "etag": etag},
        },
    }
    assert batch_embed.handler(bridge, CONTEXT) == {"objects": 1}  # its own output: skipped
    assert batch_embed.handler({"Service": "Amazon S3", "Event": "s3:TestEvent"}, CONTEXT) == {"objects": 0}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="embeddings/")["Contents"]]
    assert len(keys) == 2 and all(k.startswith("embeddings/direct.txt.") for k in keys)
