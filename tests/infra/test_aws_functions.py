"""aws-functions under Pulumi's mocks: one Lambda per function whose command names a handler that imports,
API Gateway routes for /v1, streaming Function URLs in RESPONSE_STREAM mode, least-privilege roles, the keys
only in Secrets Manager, nothing written outside /tmp."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from infra import aws_functions
from tests.infra.stacks import Recorder, assert_no_wildcard_admin, assert_secret_only_in, run

FUNCTION = "aws:lambda/function:Function"


@pytest.fixture(scope="module")
def stack() -> tuple[Recorder, dict[str, Any]]:
    return run(aws_functions.build, {"memoryMiB": {"chat": 6144}})


def test_every_buffered_function_runs_a_handler_that_exists(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    functions = {r.inputs["name"]: r.inputs for r in recorder.of(FUNCTION)}
    assert set(functions) == {f"fnserve-{n}" for n in ("models", "embeddings", "chat", "completions", "sessions")} | {
        "fnserve-chat-stream",
        "fnserve-completions-stream",
    }
    for name, fn in functions.items():
        command = fn["imageConfig"]["commands"]
        assert fn["packageType"] == "Image"
        if name.endswith("-stream"):
            assert command[:3] == ["fnserve", "serve", "--function"]
            continue
        assert command[:3] == ["python", "-m", "awslambdaric"]
        module, _, attribute = command[3].rpartition(".")
        assert module.startswith("functions.") and callable(getattr(importlib.import_module(module), attribute))
    assert functions["fnserve-chat"]["memorySize"] == 6144 and functions["fnserve-models"]["memorySize"] == 512


def test_streaming_functions_use_response_stream_function_urls(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, outputs = stack
    urls = recorder.of("aws:lambda/functionUrl:FunctionUrl")
    assert {u.inputs["functionName"] for u in urls} == {"fnserve-chat-stream", "fnserve-completions-stream"}
    assert all(u.inputs["invokeMode"] == "RESPONSE_STREAM" for u in urls)
    streaming = [r.inputs for r in recorder.of(FUNCTION) if r.inputs["name"].endswith("-stream")]
    for fn in streaming:
        env = fn["environment"]["variables"]
        assert env["AWS_LWA_INVOKE_MODE"] == "response_stream" and env["AWS_LWA_READINESS_CHECK_PATH"] == "/readiness"
        assert fn["imageUri"].endswith("-streaming")  # the image's web-adapter target
    assert "chat_stream_url" in outputs and "completions_stream_url" in outputs


def test_models_and_embeddings_are_behind_the_http_api(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, outputs = stack
    routes = {r.inputs["routeKey"] for r in recorder.of("aws:apigatewayv2/route:Route")}
    assert {"GET /v1/models", "GET /v1/models/{model+}", "POST /v1/embeddings"} <= routes
    assert recorder.one("aws:apigatewayv2/api:Api").inputs["protocolType"] == "HTTP"
    assert all(
        i.inputs["payloadFormatVersion"] == "2.0" for i in recorder.of("aws:apigatewayv2/integration:Integration")
    )
    assert outputs["url"].startswith("https://")


def test_functions_write_only_under_tmp_and_read_keys_from_the_secret(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    for fn in recorder.of(FUNCTION):
        env = fn.inputs["environment"]["variables"]
        for name in ("FNSERVE_CACHE_DIR", "NUMBA_CACHE_DIR", "HF_HOME"):
            assert env[name].startswith("/tmp/"), (fn.name, name)
        assert env["FNSERVE_API_KEYS_SECRET"].startswith("arn:") and "FNSERVE_API_KEYS" not in env
    assert_secret_only_in(recorder, {"aws:secretsmanager/secretVersion:SecretVersion"})


def test_roles_may_write_their_logs_and_read_the_secret_only(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    assert_no_wildcard_admin(recorder)
    for policy in recorder.of("aws:iam/rolePolicy:RolePolicy"):
        assert "logs:CreateLogGroup" not in recorder.text(policy)  # the stack makes the groups, with retention
    assert all(g.inputs["retentionInDays"] > 0 for g in recorder.of("aws:cloudwatch/logGroup:LogGroup"))


def test_sessions_live_in_a_dynamodb_table_shaped_as_the_store_expects(
    stack: tuple[Recorder, dict[str, Any]],
) -> None:
    """The table the store's create_table makes: id key, the owner/updated index, TTL on expires; every function
    is told where it is, and only chat and sessions may use it."""
    from shared.sessions.dynamodb import OWNER_INDEX

    recorder, outputs = stack
    table = recorder.one("aws:dynamodb/table:Table").inputs
    assert table["hashKey"] == "id" and table["billingMode"] == "PAY_PER_REQUEST"
    [index] = table["globalSecondaryIndexes"]
    assert (index["name"], index["hashKey"], index["rangeKey"]) == (OWNER_INDEX, "owner", "updated")
    assert table["ttl"] == {"attributeName": "expires", "enabled": True}
    assert "sessions_table" in outputs
    routes = {r.inputs["routeKey"] for r in recorder.of("aws:apigatewayv2/route:Route")}
    assert {"GET /v1/sessions", "POST /v1/sessions/{session_id}/rollback"} <= routes
    for fn in recorder.of(FUNCTION):
        assert fn.inputs["environment"]["variables"]["FNSERVE_SESSION_STORE"].startswith("dynamodb://")
    users = {p.name for p in recorder.of("aws:iam/rolePolicy:RolePolicy") if "dynamodb:" in recorder.text(p)}
    assert users == {"fnserve-chat", "fnserve-chat-stream", "fnserve-sessions"}
    for name in users:
        text = recorder.text(next(p for p in recorder.of("aws:iam/rolePolicy:RolePolicy") if p.name == name))
        assert "dynamodb:*" not in text and "dynamodb:Scan" not in text
