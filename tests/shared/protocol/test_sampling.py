"""A request's sampling values are checked in one place, each bad value a 400 naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import InvalidRequestError
from shared.protocol.chat import ChatCompletionRequest
from shared.protocol.completions import CompletionRequest
from shared.settings import Settings

MSG = [{"role": "user", "content": "hi"}]
LIMITS = Settings(preload=[])


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSG, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


def settings(**fields: Any) -> Settings:
    return Settings(preload=[], **fields)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"logit_bias": {"5": 101.0}}, "logit_bias"),
        ({"logit_bias": {"-1": 5}}, "logit_bias"),
        ({"logit_bias": {"x": 5}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
    ],
)
def test_impossible_values_are_rejected_naming_the_field(fields: dict[str, Any], param: str) -> None:
    requests: list[ChatCompletionRequest | CompletionRequest] = [chat(**fields)]
    if "top_logprobs" not in fields:  # a chat field
        requests.append(completion(**fields))
    for request in requests:
        with pytest.raises(InvalidRequestError) as err:
            request.to_sampling_params(LIMITS)
        assert err.value.param == param


@pytest.mark.parametrize(
    ("limit", "fields", "param"),
    [
        ({"max_n": 2}, {"n": 3}, "n"),
        ({"max_stop": 1}, {"stop": ["a", "b"]}, "stop"),
        ({"max_logit_bias": 1}, {"logit_bias": {"1": 1, "2": 1}}, "logit_bias"),
        ({"max_completion_tokens": 10}, {"max_tokens": 11}, "max_tokens"),
    ],
)
def test_the_servers_request_limits_are_named_in_the_error(
    limit: dict[str, int], fields: dict[str, Any], param: str
) -> None:
    limits = settings(**limit)
    for request in (chat(**fields), completion(**fields)):
        with pytest.raises(InvalidRequestError) as err:
            request.to_sampling_params(limits)
        assert err.value.param == param and next(iter(limit)) in err.value.message
        request.to_sampling_params(LIMITS)  # within the default limits the same request is fine


def test_messages_per_request_are_limited() -> None:
    request = ChatCompletionRequest.model_validate({"messages": MSG * 3})
    with pytest.raises(InvalidRequestError, match="max_messages"):
        request.to_sampling_params(settings(max_messages=2))
