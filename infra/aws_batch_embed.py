"""aws-batch-embed: drop files in a bucket, get embeddings back beside them.

Input bucket (public access blocked, encrypted) -> an S3 notification on a prefix/suffix -> an SQS queue
(its policy admits this bucket alone) with a dead-letter queue after 5 receives -> the `batch_embed` container
Lambda through an event-source mapping that reports partial batch failures, with its concurrency capped; a
DynamoDB idempotency table with TTL; an alarm when anything reaches the DLQ; roles that can do only what they
must. Scaling is Lambda's concurrency behind the queue: no worker pool of fnserve's own.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.aws_common import LAMBDA_ENVIRONMENT, assume_role_policy, image_repository, policy, provider_options
from infra.config import StackConfig

MAX_RECEIVE_COUNT = 5


def build(cfg: StackConfig) -> dict[str, Any]:
    name = cfg.name
    opts = provider_options(cfg)
    timeout = int(cfg.get("timeoutSeconds", 900))
    memory = int(cfg.get("memoryMiB", 3008))
    input_prefix = cfg.get("inputPrefix", "in/")
    output_prefix = cfg.get("outputPrefix", "embeddings/")
    if output_prefix.startswith(input_prefix) or input_prefix.startswith(output_prefix):
        raise ValueError("inputPrefix and outputPrefix must not contain each other: results would trigger the function")

    repository, image = image_repository(f"{name}-batch-repo", cfg, opts)

    bucket = aws.s3.Bucket(f"{name}-documents", force_destroy=False, opts=opts)
    aws.s3.BucketPublicAccessBlock(
        f"{name}-documents",
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
        opts=opts,
    )
    aws.s3.BucketServerSideEncryptionConfiguration(
        f"{name}-documents",
        bucket=bucket.id,
        rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"}}],
        opts=opts,
    )

    aws.s3.BucketPolicy(
        f"{name}-documents",
        bucket=bucket.id,
        policy=policy(
            {
                "Sid": "TLSOnly",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [bucket.arn, pulumi.Output.concat(bucket.arn, "/*")],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ),
        opts=opts,
    )

    dlq = aws.sqs.Queue(f"{name}-batch-dlq", message_retention_seconds=14 * 24 * 3600, opts=opts)
    queue = aws.sqs.Queue(
        f"{name}-batch-queue",
        visibility_timeout_seconds=6 * timeout,  # AWS's advice for a Lambda consumer: at least 6x its timeout
        message_retention_seconds=4 * 24 * 3600,
        redrive_policy=dlq.arn.apply(
            lambda arn: json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": MAX_RECEIVE_COUNT})
        ),
        opts=opts,
    )
    queue_policy = aws.sqs.QueuePolicy(
        f"{name}-batch-queue",
        queue_url=queue.id,
        policy=policy(
            {
                "Effect": "Allow",
                "Principal": {"Service": "s3.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue.arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": bucket.arn}},
            }
        ),
        opts=opts,
    )
    aws.s3.BucketNotification(
        f"{name}-documents",
        bucket=bucket.id,
        queues=[
            {
                "queue_arn": queue.arn,
                "events": ["s3:ObjectCreated:*"],
                "filter_prefix": input_prefix,
                "filter_suffix": cfg.get("inputSuffix", ""),
            }
        ],
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=[queue_policy])),
    )

    table = aws.dynamodb.Table(
        f"{name}-batch-idempotency",
        billing_mode="PAY_PER_REQUEST",
        hash_key="id",
        attributes=[{"name": "id", "type": "S"}],
        ttl={"attribute_name": "expiration", "enabled": True},
        point_in_time_recovery={"enabled": True},
        opts=opts,
    )
    fn_name = f"{name}-batch-embed"
    logs = aws.cloudwatch.LogGroup(
        f"{fn_name}-logs",
        name=f"/aws/lambda/{fn_name}",
        retention_in_days=int(cfg.get("logRetentionDays", 30)),
        opts=opts,
    )
    role = aws.iam.Role(
        fn_name,
        assume_role_policy=assume_role_policy("lambda.amazonaws.com"),
        opts=opts,
    )
    aws.iam.RolePolicy(
        fn_name,
        role=role.id,
        policy=policy(
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": pulumi.Output.concat(bucket.arn, "/", input_prefix, "*"),
            },
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:GetObject"],  # HEAD of a manifest is a GetObject
                "Resource": pulumi.Output.concat(bucket.arn, "/", output_prefix, "*"),
            },
            {
                "Effect": "Allow",
                "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
                "Resource": queue.arn,
            },
            {
                "Effect": "Allow",
                "Action": [
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                ],
                "Resource": table.arn,
            },
            {
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": pulumi.Output.concat(logs.arn, ":*"),
            },
        ),
        opts=opts,
    )
    fn = aws.lambda_.Function(
        fn_name,
        name=fn_name,
        package_type="Image",
        image_uri=image,
        image_config={"commands": ["python", "-m", "awslambdaric", "functions.batch_embed.handler"]},
        role=role.arn,
        memory_size=memory,
        timeout=timeout,
        ephemeral_storage={"size": int(cfg.get("ephemeralStorageMiB", 2048))},  # results are staged in /tmp
        environment={
            "variables": {
                **cfg.environment(),
                **LAMBDA_ENVIRONMENT,
                "FNSERVE_BATCH_OUTPUT_PREFIX": output_prefix,
                "FNSERVE_BATCH_IDEMPOTENCY_TABLE": table.name,
                "FNSERVE_BATCH_OUTPUT_FORMAT": cfg.get("outputFormat", "jsonl"),
                "POWERTOOLS_SERVICE_NAME": "fnserve-batch-embed",
            }
        },
        logging_config={"log_format": "Text", "log_group": logs.name},
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=[logs])),
    )
    aws.lambda_.EventSourceMapping(
        fn_name,
        event_source_arn=queue.arn,
        function_name=fn.arn,
        batch_size=int(cfg.get("batchSize", 10)),
        maximum_batching_window_in_seconds=int(cfg.get("batchingWindowSeconds", 5)),
        function_response_types=["ReportBatchItemFailures"],
        scaling_config={"maximum_concurrency": int(cfg.get("maxConcurrency", 10))},
        opts=opts,
    )
    topic = cfg.get("alarmTopicArn")
    aws.cloudwatch.MetricAlarm(
        f"{name}-batch-dlq",
        alarm_description="batch embedding: messages set aside in the dead-letter queue (redrive them when fixed)",
        namespace="AWS/SQS",
        metric_name="ApproximateNumberOfMessagesVisible",
        dimensions={"QueueName": dlq.name},
        statistic="Maximum",
        period=300,
        evaluation_periods=1,
        threshold=0,
        comparison_operator="GreaterThanThreshold",
        treat_missing_data="notBreaching",
        alarm_actions=[topic] if topic else [],
        opts=opts,
    )
    return {
        "bucket": bucket.bucket,
        "input": pulumi.Output.concat("s3://", bucket.bucket, "/", input_prefix),
        "output": pulumi.Output.concat("s3://", bucket.bucket, "/", output_prefix),
        "queue": queue.url,
        "dead_letter_queue": dlq.url,
        "repository": repository.repository_url,
    }
