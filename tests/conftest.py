"""Fixtures on the real embedded models, loaded once per test session."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub

from functions.app import build  # noqa: E402
from shared.catalog import ModelCatalog  # noqa: E402
from shared.generation.model import GenerationModel  # noqa: E402
from shared.generation.params import SamplingParams  # noqa: E402
from shared.generation.sequence import StepOutput  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.servers import free_port, running_server  # noqa: E402

CAPITAL = [{"role": "user", "content": "Name the capital city of France."}]
SERVER_LOGS: list[Path] = []  # the session server's log, shown under any test that fails while using it


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and "server_url" in getattr(item, "fixturenames", ()) and SERVER_LOGS:
        tail = SERVER_LOGS[0].read_text(errors="replace")[-6000:]
        report.sections.append(("fnserve server log (last 6000 characters)", tail))
    return report


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    store = tmp_path_factory.mktemp("sessions") / "sessions.db"
    return Settings(preload=[], max_running=16, max_model_len=2048, session_store=f"sqlite:///{store}")


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


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `fnserve serve` process on a free port, ready (its preloaded model loaded); its base URL."""
    log_path = tmp_path_factory.mktemp("server") / "fnserve.log"
    SERVER_LOGS.append(log_path)
    env = {
        "FNSERVE_MAX_BODY_BYTES": str(1024 * 1024),
        "FNSERVE_MAX_MODEL_LEN": "2048",
        "FNSERVE_SESSION_STORE": f"sqlite:///{log_path.parent / 'sessions.db'}",
    }
    with running_server(log_path, env) as server:
        yield server.url
        status = server.stop()
        assert status == 0, f"fnserve serve exited with {status} on SIGTERM"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """AWS as moto in server mode: a real HTTP endpoint on a free port, for the whole session."""
    from moto.server import ThreadedMotoServer

    from tests.servers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    with _dynamodb_items_written_one_at_a_time():
        server.start()
        yield f"http://127.0.0.1:{port}"
        server.stop()


@contextlib.contextmanager
def _dynamodb_items_written_one_at_a_time() -> Iterator[None]:
    """DynamoDB applies the writes to one item one at a time, each conditional write checked and applied as
    one step. moto's threaded server does not: two requests at once can both pass `version = :v` and both
    update the same item, one of them lost. Here its DynamoDB requests are served one at a time, each read or
    write whole, its answer included."""
    from moto.dynamodb.responses import DynamoHandler

    lock = threading.Lock()
    original = DynamoHandler.call_action

    @functools.wraps(original)
    def call_action(self: DynamoHandler) -> Any:
        with lock:
            return original(self)

    DynamoHandler.call_action = call_action  # type: ignore[method-assign]
    try:
        yield
    finally:
        DynamoHandler.call_action = original  # type: ignore[method-assign]


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment that points boto3 (here and in child processes) at the moto server."""
    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's package) on a free port, for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
