"""batch_embed: a Lambda function that embeds every document of each new S3 object, beside it.

Invoked by SQS with S3 `ObjectCreated` notifications (the deployed pipeline: S3 -> SQS -> Lambda, a DLQ after
`maxReceiveCount` receives), or directly by S3 or EventBridge "Object Created" events. Powertools'
`BatchProcessor` reports each failed message in `batchItemFailures`, so one bad object is retried (and in the
end set aside) alone; its idempotency utility, on a DynamoDB table, keeps a redelivered object from being
embedded twice, and the output's deterministic name keeps it from being written twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import cache
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.s3_event import S3EventBridgeNotificationEvent
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from shared.batch.pipeline import BatchOptions, Manifest, embed_source
from shared.batch.storage import S3Sink, S3Source
from shared.catalog import ModelCatalog
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

ObjectRef = dict[str, str]  # bucket, key, etag, version


@cache
def _catalog() -> ModelCatalog:
    """The container's models: loaded on the first invocation, reused by the next ones."""
    return ModelCatalog(get_settings())


@cache
def _s3() -> Any:
    import boto3

    return boto3.client("s3")


def objects_in(body: dict[str, Any]) -> list[ObjectRef]:
    """The objects an S3 notification, or an EventBridge "Object Created" event, is about. A test event is none."""
    if body.get("Event") == "s3:TestEvent":
        return []
    if body.get("detail-type") == "Object Created":
        detail = S3EventBridgeNotificationEvent(body).detail
        return [
            {
                "bucket": detail.bucket.name,
                "key": detail.object.key,
                "etag": detail.object.etag,
                "version": (body["detail"].get("object") or {}).get("version-id") or "",
            }
        ]
    refs = []
    for record in S3Event(body).records:
        if not record.event_name.startswith("ObjectCreated:"):
            continue
        obj = record.s3.get_object
        refs.append(
            {
                "bucket": record.s3.bucket.name,
                "key": unquote_plus(obj.key),  # S3 notifications send keys URL-encoded ('+' for spaces)
                "etag": obj.etag,
                "version": obj.version_id or "",
            }
        )
    return refs


def embed_object(ref: ObjectRef, settings: Settings, out_of_time: Callable[[], bool] | None = None) -> Manifest | None:
    """One object's documents embedded under the output prefix; None when skipped or already done."""
    prefix = settings.batch_output_prefix
    if ref["key"].startswith(prefix) or ".embeddings." in ref["key"]:
        return None  # our own output: never embed it (it would trigger itself)
    source = S3Source(_s3(), ref["bucket"], ref["key"], ref["etag"], ref["version"] or None)
    sink = S3Sink(_s3(), settings.batch_output_bucket or ref["bucket"], prefix)
    model = _catalog().embedding(settings.batch_model)
    options = BatchOptions(
        output_format=settings.batch_output_format,
        text_field=settings.batch_text_field,
        batch_size=settings.batch_size,
        error_budget=settings.batch_error_budget,
        model=settings.batch_model,
    )
    try:
        manifest = embed_source(source, sink, model, options, out_of_time)
    except Exception as exc:
        if _superseded(exc):
            log.info(
                "s3://%s/%s changed since this notification; its newer version has its own", ref["bucket"], ref["key"]
            )
            return None
        raise
    if manifest is not None:
        log.info("embedded %d documents of s3://%s/%s", manifest.documents, ref["bucket"], ref["key"])
    return manifest


def _superseded(exc: Exception) -> bool:
    """The object was overwritten (or deleted) after its notification: its ETag no longer matches."""
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "NoSuchKey")


@cache
def _idempotency_store(table: str) -> Any:
    from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer

    return DynamoDBPersistenceLayer(table_name=table)


def _once(settings: Settings, out_of_time: Callable[[], bool], context: Any) -> Callable[[ObjectRef], Any]:
    """embed_object for this invocation, made idempotent on (bucket, key, ETag, version) by the DynamoDB table
    when one is configured: a redelivered object is not embedded again."""
    if not settings.batch_idempotency_table:
        return lambda ref: embed_object(ref, settings, out_of_time)
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function

    config = IdempotencyConfig(expires_after_seconds=settings.batch_idempotency_seconds)
    if context is not None:
        config.register_lambda_context(context)  # an in-progress record expires with the invocation

    @idempotent_function(
        data_keyword_argument="ref",
        persistence_store=_idempotency_store(settings.batch_idempotency_table),
        config=config,
    )
    def once(ref: ObjectRef) -> dict[str, Any] | None:
        manifest = embed_object(ref, settings, out_of_time)
        return None if manifest is None else {"output": manifest.output, "documents": manifest.documents}

    return lambda ref: once(ref=ref)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """SQS batches (partial failures reported), or direct S3 / EventBridge events (a failure raises)."""
    settings = get_settings()
    margin_ms = settings.batch_time_margin_seconds * 1000

    def out_of_time() -> bool:
        return context is not None and context.get_remaining_time_in_millis() < margin_ms

    process = _once(settings, out_of_time, context)
    records = event.get("Records") or []
    if records and records[0].get("eventSource") == "aws:sqs":

        def record_handler(record: SQSRecord) -> None:
            if out_of_time():  # left for a later receive, before the function is cut off mid-object
                raise TimeoutError("out of time before this message; it will be received again")
            for ref in objects_in(json.loads(record.body)):
                process(ref)

        # An all-failed batch answers with every message failed, like any other, rather than raising.
        processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
        response = process_partial_response(event, record_handler, processor, context)
        return dict(response)
    done = [process(ref) for ref in objects_in(event)]
    return {"objects": len(done)}
