"""Every bad request gets OpenAI's error envelope with the right status, never a 500, and the server goes on."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

MSG = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "word " * 9000  # > 8192 tokens: the context of the default model
BIG_BODY = json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]})

# (name, method, path, body (dict -> JSON, str/bytes -> raw), status, code or None, param or None)
CASES: list[tuple[str, str, str, Any, int, str | None, str | None]] = [
    ("bad json", "POST", "/v1/chat/completions", b"{not json", 400, None, None),
    ("non-utf8 bytes", "POST", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400, None, None),
    ("body is a list", "POST", "/v1/chat/completions", [1, 2], 400, None, None),
    (
        "missing messages",
        "POST",
        "/v1/chat/completions",
        {"model": "default"},
        400,
        "missing_required_parameter",
        "messages",
    ),
    ("empty messages", "POST", "/v1/chat/completions", {"messages": []}, 400, None, "messages"),
    (
        "unknown role",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        400,
        None,
        None,
    ),
    (
        "content wrong type",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        400,
        None,
        None,
    ),
    (
        "image part",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        None,
        "messages[0].content",
    ),
    (
        "only a system message",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "system", "content": "hi"}]},
        400,
        None,
        "messages",
    ),
    (
        "max_tokens negative",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": -5},
        400,
        None,
        "max_tokens",
    ),
    (
        "max_tokens huge",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": 10**9},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "max_tokens a string",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": "10"},
        400,
        None,
        "max_tokens",
    ),
    ("n zero", "POST", "/v1/chat/completions", {"messages": MSG, "n": 0}, 400, None, "n"),
    ("n too many", "POST", "/v1/chat/completions", {"messages": MSG, "n": 100}, 400, None, "n"),
    (
        "temperature too high",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "temperature": 5},
        400,
        None,
        "temperature",
    ),
    ("top_p zero", "POST", "/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, None, "top_p"),
    ("stream not bool", "POST", "/v1/chat/completions", {"messages": MSG, "stream": "yes"}, 400, None, "stream"),
    (
        "logit_bias bad key",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "logit_bias": {"abc": 1}},
        400,
        None,
        "logit_bias",
    ),
    (
        "top_logprobs without logprobs",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "top_logprobs": 2},
        400,
        None,
        "top_logprobs",
    ),
    (
        "malformed tool",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "tools": [{"type": "function"}]},
        400,
        None,
        "tools",
    ),
    (
        "unknown model",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "model": "gpt-9"},
        404,
        "model_not_found",
        "model",
    ),
    (
        "embedding model for chat",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "model": "all-minilm-l6-v2"},
        400,
        None,
        "model",
    ),
    (
        "oversize prompt",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG_PROMPT}]},
        400,
        "context_length_exceeded",
        None,
    ),
    ("oversize body", "POST", "/v1/chat/completions", BIG_BODY, 413, "request_too_large", None),
    (
        "completions without prompt",
        "POST",
        "/v1/completions",
        {"model": "default"},
        400,
        "missing_required_parameter",
        "prompt",
    ),
    ("completions suffix", "POST", "/v1/completions", {"prompt": "a", "suffix": "b"}, 400, None, "suffix"),
    ("completions empty prompt list", "POST", "/v1/completions", {"prompt": []}, 400, None, "prompt"),
    ("completions token id out of range", "POST", "/v1/completions", {"prompt": [10**7]}, 400, None, "prompt"),
    ("completions logprobs too many", "POST", "/v1/completions", {"prompt": "a", "logprobs": 9}, 400, None, "logprobs"),
    (
        "embeddings invalid encoding_format",
        "POST",
        "/v1/embeddings",
        {"input": "a", "encoding_format": "base65"},
        400,
        None,
        "encoding_format",
    ),
    ("embeddings dimensions", "POST", "/v1/embeddings", {"input": "a", "dimensions": 128}, 400, None, "dimensions"),
    ("embeddings empty string", "POST", "/v1/embeddings", {"input": ""}, 400, None, "input"),
    ("embeddings empty list", "POST", "/v1/embeddings", {"input": []}, 400, None, "input"),
    ("embeddings input a number", "POST", "/v1/embeddings", {"input": 3.5}, 400, None, "input"),
    ("embeddings negative token id", "POST", "/v1/embeddings", {"input": [-5]}, 400, None, "input"),
    (
        "embeddings token id past the vocabulary",
        "POST",
        "/v1/embeddings",
        {"input": [[7], [10**9]]},
        400,
        None,
        "input",
    ),
    ("seed past 64 bits", "POST", "/v1/chat/completions", {"messages": MSG, "seed": 2**64}, 400, None, "seed"),
    (
        "completions seed below 64 bits",
        "POST",
        "/v1/completions",
        {"prompt": "a", "seed": -(2**63) - 1},
        400,
        None,
        "seed",
    ),
    (
        "embeddings chat model",
        "POST",
        "/v1/embeddings",
        {"input": "a", "model": "smollm2-135m-instruct"},
        400,
        None,
        "model",
    ),
    ("unknown model card", "GET", "/v1/models/gpt-9", None, 404, "model_not_found", "model"),
    ("unknown route", "GET", "/v1/nothing-here", None, 404, "unknown_url", None),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, None, None),
    (
        "chat on a base model",
        "POST",
        "/v1/chat/completions",
        {"messages": MSG, "model": "gemma-3-270m"},
        400,
        "chat_template_missing",
        "model",
    ),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "status", "code", "param"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request_gets_the_envelope(
    server_url: str, name: str, method: str, path: str, body: Any, status: int, code: str | None, param: str | None
) -> None:
    content = body if isinstance(body, bytes | str) else (json.dumps(body) if body is not None else None)
    response = httpx.request(
        method, server_url + path, content=content, headers={"content-type": "application/json"}, timeout=120
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            ["'image_url'", "text only"],
        ),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "a"}], ["tool's result"]),
    ],
    ids=["image part", "tool message without content"],
)
def test_a_rejected_message_is_explained_in_plain_words(server_url: str, messages: Any, words: list[str]) -> None:
    response = httpx.post(f"{server_url}/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message
    assert "Value error" not in message and "valid string" not in message, message


def test_the_server_still_serves_after_every_bad_request(server_url: str) -> None:
    for _, method, path, body, *_ in CASES:
        content = body if isinstance(body, bytes | str) else (json.dumps(body) if body is not None else None)
        httpx.request(
            method, server_url + path, content=content, headers={"content-type": "application/json"}, timeout=120
        )
    reply = httpx.post(
        f"{server_url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 3, "temperature": 0}, timeout=60
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
