"""Each function's Lambda `handler`: Mangum with API Gateway v2 and ALB events, and awslambdaric as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def api_gateway_v2(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "abc123.execute-api.eu-west-1.amazonaws.com"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "abc123.execute-api.eu-west-1.amazonaws.com",
            "domainPrefix": "abc123",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.9",
                "userAgent": "t",
            },
            "requestId": "req-1",
            "routeKey": "$default",
            "stage": "$default",
            "time": "22/Nov/2026:00:00:00 +0000",
            "timeEpoch": 1795300000000,
        },
        "body": json.dumps(body) if body is not None else None,
        "isBase64Encoded": False,
    }


def alb(method: str, path: str) -> dict[str, Any]:
    return {
        "requestContext": {
            "elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/t/1"}
        },
        "httpMethod": method,
        "path": path,
        "queryStringParameters": {},
        "headers": {"host": "fnserve.example.com", "accept": "application/json"},
        "body": "",
        "isBase64Encoded": False,
    }


CONTEXT = SimpleNamespace(aws_request_id="req-1", function_name="fnserve", get_remaining_time_in_millis=lambda: 60000)


def test_chat_handler_answers_api_gateway_v2_and_loads_the_model_once() -> None:
    from functions import chat

    event = api_gateway_v2(
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Name the capital city of France."}], "temperature": 0},
    )
    first = chat.handler(event, CONTEXT)
    assert first["statusCode"] == 200
    assert "Paris" in json.loads(first["body"])["choices"][0]["message"]["content"]
    model = chat.app.state.catalog.generation("default")
    second = chat.handler(event, CONTEXT)
    assert second["statusCode"] == 200 and json.loads(second["body"])["choices"] == json.loads(first["body"])["choices"]
    assert chat.app.state.catalog.generation("default") is model  # the container's model, reused


def test_chat_handler_errors_use_the_envelope() -> None:
    from functions import chat

    response = chat.handler(api_gateway_v2("POST", "/v1/chat/completions", {"messages": []}), CONTEXT)
    assert response["statusCode"] == 400
    assert json.loads(response["body"])["error"]["type"] == "invalid_request_error"


def test_models_handler_answers_an_alb_event() -> None:
    from functions import models

    response = models.handler(alb("GET", "/v1/models"), CONTEXT)
    assert response["statusCode"] == 200
    assert "gemma-3-270m" in [m["id"] for m in json.loads(response["body"])["data"]]


def test_embeddings_handler_answers_api_gateway_v2() -> None:
    from functions import embeddings

    response = embeddings.handler(api_gateway_v2("POST", "/v1/embeddings", {"input": ["a", "b"]}), CONTEXT)
    assert response["statusCode"] == 200
    assert [len(d["embedding"]) for d in json.loads(response["body"])["data"]] == [384, 384]


class RuntimeAPI(BaseHTTPRequestHandler):
    """A stand-in for the Lambda Runtime API: hands out queued events, records the answers."""

    protocol_version = "HTTP/1.1"
    events: list[dict[str, Any]] = []
    answers: dict[str, Any] = {}
    done = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.path != "/2018-06-01/runtime/invocation/next":
            self.send_error(404)
            return
        if not self.events:
            self.done.wait(timeout=30)  # a real runtime long-polls; end the test's process instead
            self.send_error(410)
            return
        event = self.events.pop(0)
        body = json.dumps(event["payload"]).encode()
        self.send_response(200)
        self.send_header("Lambda-Runtime-Aws-Request-Id", event["id"])
        self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 60000))
        self.send_header("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:eu-west-1:123456789012:function:models")
        self.send_header("Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000000")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        payload = self.rfile.read(length) if length else b""
        self.answers[self.path] = json.loads(payload) if payload else None
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def runtime_api() -> Iterator[tuple[str, type[RuntimeAPI]]]:
    RuntimeAPI.events, RuntimeAPI.answers = [], {}
    RuntimeAPI.done.clear()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), RuntimeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", RuntimeAPI
    RuntimeAPI.done.set()
    server.shutdown()


def test_awslambdaric_runs_the_models_function_as_a_real_process(runtime_api: tuple[str, type[RuntimeAPI]]) -> None:
    address, api = runtime_api
    api.events.append({"id": "inv-1", "payload": api_gateway_v2("GET", "/v1/models")})
    api.events.append({"id": "inv-2", "payload": api_gateway_v2("GET", "/v1/models/default")})
    env = {**os.environ, "AWS_LAMBDA_RUNTIME_API": address, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "awslambdaric", "functions.models.handler"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(api.answers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        api.done.set()
        proc.kill()
        output = proc.communicate(timeout=30)[0]
    first = api.answers.get("/2018-06-01/runtime/invocation/inv-1/response")
    assert first is not None, f"no response from the runtime process:\n{output}"
    assert first["statusCode"] == 200
    assert [m["id"] for m in json.loads(first["body"])["data"]][0] == "smollm2-135m-instruct"
    second = api.answers["/2018-06-01/runtime/invocation/inv-2/response"]
    assert json.loads(second["body"])["id"] == "smollm2-135m-instruct"
    # Lambda's runtime logs at WARNING unless told otherwise: the function sets FNSERVE_LOG_LEVEL's (info), so
    # each request's access line reaches the runtime's log (here the process's output)
    assert "GET /v1/models 200" in output and "GET /v1/models/default 200" in output, output[-2000:]
