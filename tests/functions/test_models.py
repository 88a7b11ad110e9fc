from __future__ import annotations

import httpx


async def test_models_lists_every_configured_model_with_its_kind(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    kinds = {m["id"]: m["kind"] for m in body["data"]}
    assert kinds == {
        "smollm2-135m-instruct": "chat",
        "gemma-3-270m": "completion",
        "all-minilm-l6-v2": "embedding",
    }
    for card in body["data"]:
        assert card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"]


async def test_one_model_and_the_default_alias(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models/gemma-3-270m")).json()["id"] == "gemma-3-270m"
    assert (await client.get("/v1/models/default")).json()["id"] == "smollm2-135m-instruct"
    missing = await client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
