"""aws-functions: fnserve as Lambda container functions, one per function, sized per function.

Every function runs its Mangum `handler` (buffered answers) behind an API Gateway HTTP API with the /v1 routes.
Chat and completions also run as streaming functions: the image's `lambda-streaming` target, where the AWS
Lambda Web Adapter (an extension) forwards to `fnserve serve --function <name>`, behind Function URLs in
RESPONSE_STREAM mode, so SSE reaches the client as it is generated. Sessions (/v1/sessions, and chat turns with
session_id) live in a DynamoDB table. The API keys come from a secret; each function's role may write its own
logs, read the secret and, for chat and sessions, use the sessions table, and nothing else.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws

from infra.aws_common import (
    LAMBDA_ENVIRONMENT,
    api_keys_secret,
    assume_role_policy,
    image_repository,
    policy,
    provider_options,
)
from infra.config import PORT, READY_PATH, StackConfig

OWNER_INDEX = "owner-updated"  # shared.sessions.dynamodb.OWNER_INDEX (not imported: that module imports boto3)
SESSION_ACTIONS = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"]
SESSION_ACTIONS += ["dynamodb:Query"]

# function -> (its handler, the API Gateway routes it serves, memory MiB, timeout s)
FUNCTIONS: dict[str, tuple[str, list[str], int, int]] = {
    "models": ("functions.models.handler", ["GET /v1/models", "GET /v1/models/{model+}"], 512, 15),
    "embeddings": ("functions.embeddings.handler", ["POST /v1/embeddings"], 2048, 60),
    "chat": ("functions.chat.handler", ["POST /v1/chat/completions"], 4096, 300),
    "completions": ("functions.completions.handler", ["POST /v1/completions"], 4096, 300),
    "sessions": (
        "functions.sessions.handler",
        [
            "GET /v1/sessions",
            "POST /v1/sessions",
            "GET /v1/sessions/{session_id}",
            "PATCH /v1/sessions/{session_id}",
            "DELETE /v1/sessions/{session_id}",
            "POST /v1/sessions/{session_id}/rollback",
            "GET /v1/sessions/{session_id}/export",
        ],
        512,
        15,
    ),
}
STREAMING = ("chat", "completions")
SESSION_USERS = ("chat", "sessions")  # the functions that read and write sessions (chat: session_id turns)


def build(cfg: StackConfig) -> dict[str, Any]:
    name = cfg.name
    opts = provider_options(cfg)
    memory: dict[str, int] = cfg.get("memoryMiB", {})
    reserved = cfg.get("reservedConcurrency")
    log_days = int(cfg.get("logRetentionDays", 30))

    repository, image = image_repository(f"{name}-fn-repo", cfg, opts)
    streaming_image = cfg.get("streamingImage") or pulumi.Output.concat(
        repository.repository_url, ":", cfg.image_tag, "-streaming"
    )
    secret = api_keys_secret(f"{name}-fn-api-keys", cfg, opts)
    api = aws.apigatewayv2.Api(f"{name}-api", protocol_type="HTTP", opts=opts)
    aws.apigatewayv2.Stage(f"{name}-api", api_id=api.id, name="$default", auto_deploy=True, opts=opts)
    sessions = _sessions_table(f"{name}-sessions", opts)
    environment = {
        **cfg.environment(),
        **LAMBDA_ENVIRONMENT,
        "FNSERVE_SESSION_STORE": pulumi.Output.concat("dynamodb://", sessions.name),
    }
    urls: dict[str, Any] = {}
    for function, (handler, routes, default_memory, timeout) in FUNCTIONS.items():
        variants = [(function, image, ["python", "-m", "awslambdaric", handler], False)]
        if function in STREAMING:
            serve = ["fnserve", "serve", "--function", function, "--host", "127.0.0.1", "--port", str(PORT)]
            variants.append((f"{function}-stream", streaming_image, serve, True))
        for label, uri, command, streaming in variants:
            fn_name = f"{name}-{label}"
            logs = aws.cloudwatch.LogGroup(
                f"{fn_name}-logs", name=f"/aws/lambda/{fn_name}", retention_in_days=log_days, opts=opts
            )
            role = _role(fn_name, logs, secret, sessions if function in SESSION_USERS else None, opts)
            env = {**environment, "FNSERVE_API_KEYS_SECRET": secret.arn}
            if streaming:  # the web adapter's settings: stream the response, wait for readiness first
                env |= {"AWS_LWA_INVOKE_MODE": "response_stream", "AWS_LWA_PORT": str(PORT)}
                env |= {"AWS_LWA_READINESS_CHECK_PATH": READY_PATH}
            fn = aws.lambda_.Function(
                fn_name,
                name=fn_name,
                package_type="Image",
                image_uri=uri,
                image_config={"commands": command},
                role=role.arn,
                memory_size=int(memory.get(function, default_memory)),
                timeout=timeout,
                reserved_concurrent_executions=int(reserved) if reserved is not None else None,
                environment={"variables": env},
                logging_config={"log_format": "Text", "log_group": logs.name},
                opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=[logs])),
            )
            if streaming:
                url = aws.lambda_.FunctionUrl(
                    fn_name,
                    function_name=fn.name,
                    authorization_type="NONE",  # fnserve checks the API key itself
                    invoke_mode="RESPONSE_STREAM",
                    cors={"allow_origins": cfg.get("corsOrigins", []), "allow_methods": ["POST"]},
                    opts=opts,
                )
                urls[f"{function}_stream_url"] = url.function_url
                continue
            integration = aws.apigatewayv2.Integration(
                fn_name,
                api_id=api.id,
                integration_type="AWS_PROXY",
                integration_uri=fn.invoke_arn,
                payload_format_version="2.0",
                timeout_milliseconds=min(timeout, 30) * 1000,  # API Gateway's ceiling is 30 s
                opts=opts,
            )
            for i, route in enumerate(routes):
                aws.apigatewayv2.Route(
                    f"{fn_name}-{i}",
                    api_id=api.id,
                    route_key=route,
                    target=pulumi.Output.concat("integrations/", integration.id),
                    opts=opts,
                )
            aws.lambda_.Permission(
                fn_name,
                action="lambda:InvokeFunction",
                function=fn.name,
                principal="apigateway.amazonaws.com",
                source_arn=pulumi.Output.concat(api.execution_arn, "/*/*"),
                opts=opts,
            )
    return {
        "url": pulumi.Output.concat(api.api_endpoint, "/v1"),
        "repository": repository.repository_url,
        "sessions_table": sessions.name,
        **urls,
    }


def _sessions_table(resource: str, opts: pulumi.ResourceOptions | None) -> aws.dynamodb.Table:
    """The session store's table, as shared.sessions.dynamodb.create_table makes it: sessions by id, an index by
    owner and last update, DynamoDB's TTL on `expires`."""
    return aws.dynamodb.Table(
        resource,
        billing_mode="PAY_PER_REQUEST",
        hash_key="id",
        attributes=[{"name": "id", "type": "S"}, {"name": "owner", "type": "S"}, {"name": "updated", "type": "N"}],
        global_secondary_indexes=[
            {"name": OWNER_INDEX, "hash_key": "owner", "range_key": "updated", "projection_type": "ALL"}
        ],
        ttl={"attribute_name": "expires", "enabled": True},
        point_in_time_recovery={"enabled": True},
        opts=opts,
    )


def _role(
    fn_name: str,
    logs: aws.cloudwatch.LogGroup,
    secret: aws.secretsmanager.Secret,
    sessions: aws.dynamodb.Table | None,
    opts: pulumi.ResourceOptions | None,
) -> aws.iam.Role:
    """A role that may write this function's logs, read the keys' secret and (where it needs them) read and
    write the sessions table, and nothing else."""
    role = aws.iam.Role(fn_name, assume_role_policy=assume_role_policy("lambda.amazonaws.com"), opts=opts)
    statements: list[dict[str, Any]] = [
        {
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": pulumi.Output.concat(logs.arn, ":*"),
        },
        {"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": secret.arn},
    ]
    if sessions is not None:
        statements.append(
            {
                "Effect": "Allow",
                "Action": SESSION_ACTIONS,
                "Resource": [sessions.arn, pulumi.Output.concat(sessions.arn, "/index/", OWNER_INDEX)],
            }
        )
    aws.iam.RolePolicy(fn_name, role=role.id, policy=policy(*statements), opts=opts)
    return role
