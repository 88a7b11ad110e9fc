"""POST /v1/embeddings in-process, against the real embedded model."""

from __future__ import annotations

import httpx


async def test_token_arrays_embed_like_their_text(client: httpx.AsyncClient, catalog) -> None:  # type: ignore[no-untyped-def]
    model = catalog.embedding("default")
    ids = [e.ids[1:-1] for e in model._tokenizer.encode_batch(["a red apple"])][0]  # without [CLS] and [SEP]
    by_text = (await client.post("/v1/embeddings", json={"input": "a red apple"})).json()
    by_ids = (await client.post("/v1/embeddings", json={"input": ids})).json()
    assert by_ids["data"][0]["embedding"] == by_text["data"][0]["embedding"]


async def test_usage_counts_the_models_tokens(client: httpx.AsyncClient) -> None:
    result = (await client.post("/v1/embeddings", json={"input": ["hello world", "hi"]})).json()
    assert result["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in result["data"]] == [0, 1]
    assert result["model"] == "all-minilm-l6-v2"


async def test_dimensions_equal_to_the_models_own_are_accepted(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/embeddings", json={"input": "x", "dimensions": 384})).status_code == 200
