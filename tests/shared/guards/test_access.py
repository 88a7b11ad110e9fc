"""API keys on a real server: every route family (aliases included) asks for a key once keys exist; probes
never do; keys rotate without a restart; no key reaches the log."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from tests.servers import FNSERVE, Server, running_server

MSG = [{"role": "user", "content": "hi"}]
# (method, path, body): one of every route family, the aliases without /v1 and the /api/* shapes included
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 2}),
    ("POST", "/chat/completions", {"messages": MSG, "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2}),
    ("POST", "/completions", {"prompt": "Once", "max_tokens": 2}),
    ("POST", "/v1/embeddings", {"input": "hello"}),
    ("POST", "/embeddings", {"input": "hello"}),
    ("GET", "/v1/models", None),
    ("GET", "/models", None),
    ("GET", "/v1/models/default", None),
    ("POST", "/api/generate", {"prompt": "Once", "max_tokens": 2}),
    ("POST", "/api/generate/stream", {"prompt": "Once", "max_tokens": 2}),
    ("POST", "/api/chat", {"messages": MSG, "max_tokens": 2}),
    ("GET", "/api/models", None),
    ("GET", "/v1/sessions", None),
    ("POST", "/sessions", {}),
]
PROBES = ["/health", "/health/live", "/readiness", "/health/ready", "/metrics"]


def create_key(keys_file: Path, name: str, *extra: str) -> str:
    done = subprocess.run(
        [str(FNSERVE), "keys", "create", name, "--file", str(keys_file), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str], Path]]:
    folder = tmp_path_factory.mktemp("keys")
    keys_file = folder / "keys.toml"
    keys = {name: create_key(keys_file, name) for name in ("alice", "bob", "carol")}
    text = keys_file.read_text()
    # carol's key is disabled by hand, as an operator would
    head, _, tail = text.partition('name = "carol"')
    keys_file.write_text(head + 'name = "carol"' + tail.replace("enabled = true", "enabled = false", 1))
    env = {
        "FNSERVE_API_KEYS_FILE": str(keys_file),
        "FNSERVE_PRELOAD": "[]",
        "FNSERVE_SESSION_STORE": f"sqlite:///{folder / 'sessions.db'}",
    }
    with running_server(folder / "fnserve.log", env) as server:
        yield server, keys, keys_file


def call(
    server: Server, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=120)


def test_keys_file_holds_hashes_only(keyed: tuple[Server, dict[str, str], Path]) -> None:
    _, keys, keys_file = keyed
    text = keys_file.read_text()
    assert all(key.startswith("fns-") and key not in text for key in keys.values())
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_a_valid_enabled_key(
    keyed: tuple[Server, dict[str, str], Path], method: str, path: str, body: dict[str, Any] | None
) -> None:
    server, keys, _ = keyed
    for headers, status, code in (
        ({}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer fns-not-a-key"}, 401, "invalid_api_key"),
        ({"Authorization": f"Basic {keys['alice']}"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {keys['carol']}"}, 403, "api_key_disabled"),
    ):
        refused = call(server, method, path, body, headers)
        assert refused.status_code == status, (headers, refused.text)
        assert refused.json()["error"]["code"] == code
        assert refused.json()["error"]["request_id"] == refused.headers["x-request-id"]
    for headers in ({"Authorization": f"Bearer {keys['alice']}"}, {"api-key": keys["bob"]}):
        allowed = call(server, method, path, body, headers)
        assert allowed.status_code == 200, (headers, allowed.text)


def test_probes_need_no_key(keyed: tuple[Server, dict[str, str], Path]) -> None:
    server, _, _ = keyed
    for path in PROBES:
        assert httpx.get(server.url + path, timeout=30).status_code == 200, path


def test_the_openai_client_with_a_key_and_without(keyed: tuple[Server, dict[str, str], Path]) -> None:
    server, keys, _ = keyed
    good = OpenAI(base_url=f"{server.url}/v1", api_key=keys["alice"])
    assert "default" not in [m.id for m in good.models.list()]  # listed by their own ids
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_new_key_works_without_a_restart_and_on_sighup(keyed: tuple[Server, dict[str, str], Path]) -> None:
    server, _, keys_file = keyed
    dave = create_key(keys_file, "dave")
    assert call(server, "GET", "/v1/models", None, {"Authorization": f"Bearer {dave}"}).status_code == 200
    # a change the file's modification time does not show (same second, same size): SIGHUP reads it again
    stat = keys_file.stat()
    text = keys_file.read_text()
    head, _, tail = text.partition('name = "dave"')
    keys_file.write_text(head + 'name = "dave"' + tail.replace("enabled = true", "enabled = fals", 1) + " ")
    keys_file.write_text(head + 'name = "dave"' + tail.replace("enabled = true", "enabled = false", 1))
    os.utime(keys_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if call(server, "GET", "/v1/models", None, {"Authorization": f"Bearer {dave}"}).status_code == 403:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("SIGHUP did not reload the keys file")


def test_no_key_appears_in_the_log(keyed: tuple[Server, dict[str, str], Path]) -> None:
    server, keys, _ = keyed
    call(server, "GET", "/v1/models", None, {"Authorization": f"Bearer {keys['alice']}"})
    log = server.log()
    assert '"key": "alice"' in log  # the key's name is logged ...
    assert all(key not in log for key in keys.values())  # ... never the key


def test_one_keys_requests_never_reuse_anothers_cached_prompts(keyed: tuple[Server, dict[str, str], Path]) -> None:
    """Cached prefixes stay within the key that made them, so no key can tell from response times what another
    key's requests said; a key's own next request reuses them."""
    server, keys, _ = keyed
    system = {"role": "system", "content": "You answer in one word. The secret code of this office is ALBATROSS."}

    def ask(key: str, question: str) -> int:
        body = {"messages": [system, {"role": "user", "content": question}], "max_tokens": 2, "temperature": 0}
        response = call(server, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {keys[key]}"})
        assert response.status_code == 200, response.text
        stats = httpx.get(server.url + "/health", timeout=30).json()["models"]["smollm2-135m-instruct"]
        return int(stats["prefix_cache_hits"])

    hits = ask("alice", "What is the code?")
    assert ask("bob", "What is the code?") == hits  # the same system prompt, but alice's: no reuse
    assert ask("alice", "Say it again.") == hits + 1  # alice's own entry
    assert ask("bob", "Say it again.") == hits + 2  # and bob's, from his first request
