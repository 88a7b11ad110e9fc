"""aws-batch-embed under Pulumi's mocks: a private encrypted bucket notifying a queue (visibility >= 6x the
function's timeout, a DLQ after 5 receives), an event-source mapping with partial batch responses, the
idempotency table with TTL, a DLQ alarm, least-privilege IAM."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infra import aws_batch_embed
from tests.infra.stacks import Recorder, assert_no_wildcard_admin, run

CONFIG = {"timeoutSeconds": 600, "maxConcurrency": 4, "batchSize": 5}


@pytest.fixture(scope="module")
def stack() -> tuple[Recorder, dict[str, Any]]:
    return run(aws_batch_embed.build, CONFIG)


def test_the_bucket_is_private_encrypted_and_notifies_the_queue_on_the_input_prefix(
    stack: tuple[Recorder, dict[str, Any]],
) -> None:
    recorder, outputs = stack
    block = recorder.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    assert all(
        block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
    )
    encryption = recorder.one("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
    assert "AES256" in recorder.text(encryption)
    bucket_policy = json.loads(recorder.one("aws:s3/bucketPolicy:BucketPolicy").inputs["policy"])
    (deny,) = bucket_policy["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    (notification,) = recorder.one("aws:s3/bucketNotification:BucketNotification").inputs["queues"]
    assert notification["events"] == ["s3:ObjectCreated:*"] and notification["filterPrefix"] == "in/"
    policy = json.loads(recorder.one("aws:sqs/queuePolicy:QueuePolicy").inputs["policy"])
    (statement,) = policy["Statement"]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"} and statement["Action"] == "sqs:SendMessage"
    assert "aws:SourceArn" in statement["Condition"]["ArnEquals"]  # this bucket alone may send
    assert outputs["output"].endswith("/embeddings/")


def test_the_queue_redrives_to_a_dlq_and_outlasts_the_function(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    queues = {q.name: q.inputs for q in recorder.of("aws:sqs/queue:Queue")}
    queue = queues["fnserve-batch-queue"]
    redrive = json.loads(queue["redrivePolicy"])
    assert redrive["maxReceiveCount"] == 5 and redrive["deadLetterTargetArn"].endswith("fnserve-batch-dlq")
    function = recorder.one("aws:lambda/function:Function").inputs
    assert queue["visibilityTimeoutSeconds"] >= 6 * function["timeout"]
    alarm = recorder.one("aws:cloudwatch/metricAlarm:MetricAlarm").inputs
    assert alarm["metricName"] == "ApproximateNumberOfMessagesVisible" and alarm["threshold"] == 0


def test_the_function_consumes_the_queue_with_partial_batch_responses(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    function = recorder.one("aws:lambda/function:Function").inputs
    assert function["imageConfig"]["commands"][-1] == "functions.batch_embed.handler"
    env = function["environment"]["variables"]
    assert env["FNSERVE_BATCH_IDEMPOTENCY_TABLE"] and env["FNSERVE_BATCH_OUTPUT_PREFIX"] == "embeddings/"
    mapping = recorder.one("aws:lambda/eventSourceMapping:EventSourceMapping").inputs
    assert mapping["functionResponseTypes"] == ["ReportBatchItemFailures"]
    assert (mapping["batchSize"], mapping["scalingConfig"]["maximumConcurrency"]) == (5, 4)
    table = recorder.one("aws:dynamodb/table:Table").inputs
    assert table["ttl"] == {"attributeName": "expiration", "enabled": True} and table["hashKey"] == "id"


def test_iam_reads_inputs_writes_outputs_and_nothing_more(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    assert_no_wildcard_admin(recorder)
    (policy,) = recorder.of("aws:iam/rolePolicy:RolePolicy")
    statements = json.loads(policy.inputs["policy"])["Statement"]
    writes = [s for s in statements if "s3:PutObject" in s["Action"]]
    assert len(writes) == 1 and writes[0]["Resource"].endswith("/embeddings/*")


def test_prefixes_that_would_trigger_themselves_are_refused() -> None:
    with pytest.raises(Exception, match="must not contain each other"):
        run(aws_batch_embed.build, {"inputPrefix": "", "outputPrefix": "embeddings/"})
