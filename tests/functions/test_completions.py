"""POST /v1/completions in-process, against the real embedded models."""

from __future__ import annotations

import httpx


async def test_token_array_prompts_equal_their_text(client: httpx.AsyncClient, smol) -> None:  # type: ignore[no-untyped-def]
    ids = smol.encode("One, two, three,")
    as_text = (
        await client.post("/v1/completions", json={"prompt": "One, two, three,", "max_tokens": 6, "temperature": 0})
    ).json()
    as_ids = (await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0})).json()
    assert as_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    assert as_ids["usage"]["prompt_tokens"] == len(ids)
    batch = (
        await client.post("/v1/completions", json={"prompt": [ids, ids], "max_tokens": 6, "temperature": 0})
    ).json()
    assert [c["text"] for c in batch["choices"]] == [as_text["choices"][0]["text"]] * 2


async def test_default_max_tokens_is_openais_16(client: httpx.AsyncClient) -> None:
    body = {"prompt": "Once upon a time", "temperature": 0, "ignore_eos": True}
    result = (await client.post("/v1/completions", json=body)).json()
    assert result["usage"]["completion_tokens"] == 16 and result["choices"][0]["finish_reason"] == "length"


async def test_batch_with_n_orders_choices_prompt_major(client: httpx.AsyncClient) -> None:
    body = {"prompt": ["Red, green,", "One, two,"], "n": 2, "max_tokens": 4, "temperature": 0}
    choices = (await client.post("/v1/completions", json=body)).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] != choices[2]["text"] == choices[3]["text"]
