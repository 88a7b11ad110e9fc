"""GET /v1/models: the models this server can serve, and what kind each is."""

from __future__ import annotations

from fastapi import APIRouter

from shared.asgi import create_app, lambda_handler
from shared.catalog import ModelCatalog
from shared.http import CatalogDep
from shared.protocol.common import ModelCard, ModelList
from shared.settings import ModelConfig

router = APIRouter(tags=["models"])

_STARTED = 1767225600  # 2026-01-01: a stable `created` for models that have no release date of their own


def _card(catalog: ModelCatalog, config: ModelConfig) -> ModelCard:
    loaded = catalog.is_loaded(config.id)
    context_length = None
    if loaded and config.kind == "generate":
        context_length = catalog.generation(config.id).context_length
    return ModelCard(
        id=config.id,
        created=_STARTED,
        owned_by=config.owned_by,
        kind=catalog.card_kind(config),
        loaded=loaded,
        context_length=context_length,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(catalog: CatalogDep) -> ModelList:
    """List the models available, with what kind each is (chat, completion or embedding)."""
    return ModelList(data=[_card(catalog, c) for c in catalog.configs])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, catalog: CatalogDep) -> ModelCard:
    """Describe one model; `default` names the default chat model."""
    return _card(catalog, catalog.config(model_id))


app = create_app(router, title="fnserve models")
handler = lambda_handler(app)
