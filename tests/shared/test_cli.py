"""`fnserve serve` as a real process, talked to with the official openai client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

FNSERVE = Path(sys.executable).parent / "fnserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [str(FNSERVE), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fnserve serve exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("fnserve serve did not answer within 180 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_openai_client_chats_with_the_served_default_model(server: str) -> None:
    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert "smollm2-135m-instruct" in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content


def test_serve_refuses_a_backend_that_cannot_run() -> None:
    env = {**os.environ, "FNSERVE_BACKEND": "cuda"}
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    except ImportError:
        pass
    done = subprocess.run(
        [str(FNSERVE), "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "backend 'cuda' was asked for" in done.stderr


def test_serve_reports_invalid_settings_readably() -> None:
    env = {**os.environ, "FNSERVE_DEFAULT_MODEL": "nope"}
    done = subprocess.run([str(FNSERVE), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "default_model='nope'" in done.stderr
