"""`fnserve serve` as orchestrators see it: readiness while models load and while it drains on SIGTERM, a
stream in flight finishing within the grace period, exit status 0; and TLS with a certificate of its own."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.servers import launch, running_server, wait_until

LONG = {
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 60,
    "ignore_eos": True,
    "temperature": 0,
    "stream": True,
}


def test_readiness_is_503_while_the_preloaded_models_load_and_health_answers(tmp_path: Path) -> None:
    server = launch(tmp_path / "fnserve.log", {"FNSERVE_PRELOAD": '["default", "default-embedding"]'})
    try:
        seen: list[tuple[int, int]] = []  # (readiness, health) status pairs
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (seen and seen[-1][0] == 200):
            assert server.proc.poll() is None, server.log()
            try:
                ready = httpx.get(f"{server.url}/readiness", timeout=5)
                seen.append((ready.status_code, httpx.get(f"{server.url}/health/live", timeout=5).status_code))
            except httpx.HTTPError:
                time.sleep(0.02)
        assert seen and seen[0] == (503, 200), seen[:3]  # listening at once, not ready until loaded
        assert seen[-1] == (200, 200)
        assert httpx.get(f"{server.url}/health/ready", timeout=5).json() == {"status": "ready"}
        models = httpx.get(f"{server.url}/v1/models", timeout=5).json()["data"]
        assert all(m["loaded"] for m in models if m["id"] in ("smollm2-135m-instruct", "all-minilm-l6-v2"))
    finally:
        assert server.stop() == 0


def stream_in_background(url: str, body: dict[str, Any]) -> tuple[threading.Thread, list[str]]:
    """A streamed chat read on its own thread, once its first frame has come; its data frames as they arrive."""
    frames: list[str] = []
    first = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frames.append(line[6:])
                    first.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(60), "no frame came"
    return reader, frames


def test_sigterm_drains_a_stream_in_flight_refuses_new_work_and_exits_0(tmp_path: Path) -> None:
    with running_server(tmp_path / "fnserve.log", {"FNSERVE_DRAIN_SECONDS": "120"}) as server:
        reader, frames = stream_in_background(server.url, LONG)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{server.url}/readiness", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={**LONG, "stream": False}, timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "server_overloaded"
        reader.join(120)
        assert server.proc.wait(60) == 0
        assert frames[-1] == "[DONE]"
        finishes = [c["finish_reason"] for f in frames[:-1] for c in json.loads(f)["choices"]]
        assert finishes[-1] == "length"  # the whole answer, all 60 tokens
        assert all("error" not in json.loads(f) for f in frames[:-1])


def test_a_stream_past_the_grace_period_ends_with_an_error_frame_and_the_process_exits_0(tmp_path: Path) -> None:
    with running_server(tmp_path / "fnserve.log", {"FNSERVE_DRAIN_SECONDS": "1"}) as server:
        reader, frames = stream_in_background(server.url, {**LONG, "max_tokens": 1500})
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert server.proc.wait(60) == 0
        assert time.monotonic() - started < 20
        error = json.loads(frames[-1])["error"]
        assert "shutting down" in error["message"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA made here, and a server certificate it signed for 127.0.0.1: (ca, cert, key) PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    return folder / "ca.pem", folder / "cert.pem", folder / "key.pem"


def test_the_server_speaks_tls_with_its_own_certificate(tmp_path: Path, certificate: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certificate
    args = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    with running_server(tmp_path / "fnserve.log", {"FNSERVE_PRELOAD": "[]"}, args, verify=str(ca)) as server:
        assert server.url.startswith("https://")
        response = httpx.get(f"{server.url}/v1/models", verify=str(ca), timeout=30)
        assert response.status_code == 200 and response.json()["object"] == "list"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/v1/models", timeout=10)  # not trusted without the CA
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "/v1/models", timeout=10)  # no plain HTTP


def test_tls_files_come_from_settings_too(tmp_path: Path, certificate: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certificate
    env = {"FNSERVE_PRELOAD": "[]", "FNSERVE_SSL_CERTFILE": str(cert), "FNSERVE_SSL_KEYFILE": str(key)}
    server = launch(tmp_path / "fnserve.log", env)
    server.url = server.url.replace("http://", "https://")
    try:
        wait_until(server, verify=str(ca))
    finally:
        assert server.stop() == 0
