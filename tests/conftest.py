"""Fixtures on the real embedded models, loaded once per test session."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub

from functions.app import build  # noqa: E402
from shared.catalog import ModelCatalog  # noqa: E402
from shared.generation.model import GenerationModel  # noqa: E402
from shared.generation.params import SamplingParams  # noqa: E402
from shared.generation.sequence import StepOutput  # noqa: E402
from shared.settings import Settings  # noqa: E402

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(preload=[])


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[FastAPI]:
    app = build(settings)
    yield app
    app.state.catalog.close()


@pytest.fixture(scope="session")
def catalog(app: FastAPI) -> ModelCatalog:
    catalog: ModelCatalog = app.state.catalog
    return catalog


@pytest.fixture(scope="session")
def smol(catalog: ModelCatalog) -> GenerationModel:
    return catalog.generation("default")


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fnserve.test") as client:
        yield client


def run_steps(model: GenerationModel, prompt_ids: list[int], params: SamplingParams) -> list[StepOutput]:
    """Every step of one generation, driven from synchronous test code."""

    async def collect() -> list[StepOutput]:
        return [step async for step in model.generate(prompt_ids, params)]

    return asyncio.run(collect())
