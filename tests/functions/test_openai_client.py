"""End to end: the real server process and the official openai client, on the real embedded models."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

CAPITAL: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name the capital city of France."}]


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_chat_streamed_text_equals_plain_text_for_greedy(client: OpenAI) -> None:
    plain = client.chat.completions.create(model="default", messages=CAPITAL, temperature=0)
    stream = client.chat.completions.create(
        model="default",
        messages=CAPITAL,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens  # type: ignore[union-attr]


def test_chat_n_two_seeded_choices_are_reproducible(client: OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Invent a name for a cat."}]

    def ask() -> list[str]:
        reply = client.chat.completions.create(
            model="default",
            messages=messages,
            n=2,
            seed=11,
            temperature=1.0,
            max_tokens=12,
        )
        assert [c.index for c in reply.choices] == [0, 1]
        assert 2 <= reply.usage.completion_tokens <= 24  # type: ignore[union-attr]  # both choices counted
        return [c.message.content or "" for c in reply.choices]

    first = ask()
    assert ask() == first
    assert first[0] != first[1]


def test_chat_stop_and_max_tokens(client: OpenAI) -> None:
    full = client.chat.completions.create(model="default", messages=CAPITAL, temperature=0).choices[0]
    assert full.message.content and " is " in full.message.content
    cut = client.chat.completions.create(model="default", messages=CAPITAL, temperature=0, stop=[" is "]).choices[0]
    assert cut.message.content == full.message.content.split(" is ")[0] and cut.finish_reason == "stop"
    short = client.chat.completions.create(model="default", messages=CAPITAL, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2  # type: ignore[union-attr]


def test_chat_logprobs(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="default",
        messages=CAPITAL,
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token


def test_completions_single_batch_echo_and_logprobs(client: OpenAI) -> None:
    one = client.completions.create(
        model="gemma-3-270m", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in one.choices[0].text or "France" in one.choices[0].text
    assert one.usage.completion_tokens == 8 and one.choices[0].finish_reason == "length"  # type: ignore[union-attr]
    batch = client.completions.create(model="default", prompt=["One, two,", "Red, green,"], max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text != batch.choices[1].text
    echo = client.completions.create(model="default", prompt="One, two,", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text == "One, two," + batch.choices[0].text[: len(echo.choices[0].text) - 9]
    lp = client.completions.create(model="default", prompt="One, two,", max_tokens=3, temperature=0, logprobs=2)
    assert lp.choices[0].logprobs is not None and len(lp.choices[0].logprobs.tokens or []) == 3
    assert all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs or [])


def test_completions_stream_equals_plain(client: OpenAI) -> None:
    plain = client.completions.create(model="default", prompt="Once upon a time", max_tokens=16, temperature=0)
    stream = client.completions.create(
        model="default", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == plain.choices[0].text


def test_embeddings_single_batch_and_base64(client: OpenAI) -> None:
    single = client.embeddings.create(model="default", input="A man is playing a guitar.")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 384
    assert single.usage.prompt_tokens > 0
    batch = client.embeddings.create(
        model="all-minilm-l6-v2", input=["A man is playing a guitar.", "Someone strums a guitar.", "Stocks fell."]
    )
    vectors = np.array([d.embedding for d in batch.data])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert np.allclose(vectors[0], single.data[0].embedding, atol=1e-5)
    # The openai client asks for base64 by default and decodes it; ask explicitly too and decode by hand.
    raw = client.embeddings.with_raw_response.create(
        model="default", input="A man is playing a guitar.", encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), single.data[0].embedding, atol=1e-6)


def test_models_list_and_retrieve(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2-135m-instruct", "gemma-3-270m", "all-minilm-l6-v2"]
    assert client.models.retrieve("gemma-3-270m").id == "gemma-3-270m"
