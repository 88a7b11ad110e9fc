"""Sessions on a real server: the /v1/sessions API and its aliases, chat turns with session_id (history used
and trimmed, only whole replies kept, concurrent turns never interleaved), keys owning their sessions, and a
session surviving a restart and a kill -9 mid-turn."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, launch, running_server, wait_until

KEYS = ["sk-alice-0123456789", "sk-bob-0123456789"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("sessions")
    env = {
        "FNSERVE_SESSION_STORE": f"sqlite:///{folder / 'sessions.db'}",
        "FNSERVE_API_KEYS": json.dumps(KEYS),
        "FNSERVE_MAX_MODEL_LEN": "1024",
    }
    with running_server(folder / "fnserve.log", env) as server:
        yield server


def call(server: Server, method: str, path: str, body: Any = None, key: str = KEYS[0]) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", json=body, headers=auth(key), timeout=120)


def turn(server: Server, session_id: str, content: str, key: str = KEYS[0], **extra: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "session_id": session_id, "temperature": 0, **extra}
    return call(server, "POST", "/v1/chat/completions", body, key)


def test_the_session_api_and_its_aliases(server: Server) -> None:
    made = call(server, "POST", "/v1/sessions", {"title": "first", "settings": {"temperature": 0.2}}).json()
    sid = made["id"]
    assert made["object"] == "session" and made["messages"] == [] and made["settings"] == {"temperature": 0.2}
    second = call(server, "POST", "/sessions", {}).json()["id"]
    page = call(server, "GET", "/v1/sessions?limit=1").json()
    assert [s["id"] for s in page["data"]] == [second] and page["has_more"]
    rest = call(server, "GET", f"/v1/sessions?limit=1&before={page['next_before']}").json()
    assert [s["id"] for s in rest["data"]] == [sid] and not rest["has_more"]
    assert call(server, "PATCH", f"/v1/sessions/{sid}", {"title": "renamed"}).json()["title"] == "renamed"
    assert turn(server, sid, "Say hello.", max_tokens=8).status_code == 200
    got = call(server, "GET", f"/chat/history/{sid}").json()
    assert [m["role"] for m in got["messages"]] == ["user", "assistant"]
    assert got["messages"][0]["content"] == "Say hello." and got["messages"][1]["tokens"] >= 1
    markdown = httpx.get(f"{server.url}/v1/sessions/{sid}/export?format=markdown", headers=auth(KEYS[0]))
    assert markdown.headers["content-type"].startswith("text/markdown") and "# renamed" in markdown.text
    assert "Say hello." in markdown.text
    assert call(server, "GET", f"/v1/sessions/{sid}/export").json()["messages"] == got["messages"]
    rolled = call(server, "POST", f"/chat/history/{sid}/rollback", {"amount": 1}).json()
    assert [m["role"] for m in rolled["messages"]] == ["user"]
    assert call(server, "POST", f"/v1/sessions/{sid}/rollback", {"amount": 5}).json()["messages"] == []
    assert call(server, "DELETE", f"/v1/sessions/{sid}").json() == {
        "id": sid,
        "object": "session.deleted",
        "deleted": True,
    }
    assert call(server, "GET", f"/v1/sessions/{sid}").status_code == 404
    assert call(server, "DELETE", f"/chat/history/{second}").status_code == 200


def test_another_keys_session_is_not_found(server: Server) -> None:
    sid = call(server, "POST", "/v1/sessions", {}).json()["id"]
    for method, path, body in [
        ("GET", f"/v1/sessions/{sid}", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
        ("POST", f"/v1/sessions/{sid}/rollback", {"amount": 1}),
    ]:
        response = call(server, method, path, body, key=KEYS[1])
        assert response.status_code == 404 and response.json()["error"]["code"] == "session_not_found"
    assert turn(server, sid, "hi", key=KEYS[1]).status_code == 404
    assert sid not in [s["id"] for s in call(server, "GET", "/v1/sessions", key=KEYS[1]).json()["data"]]
    assert call(server, "GET", f"/v1/sessions/{sid}").status_code == 200
    assert httpx.get(f"{server.url}/v1/sessions").status_code == 401


def test_turns_use_the_history_and_keep_each_whole_reply(server: Server) -> None:
    sid = call(server, "POST", "/v1/sessions", {}).json()["id"]
    first = turn(server, sid, "Name the capital city of France.").json()
    second = turn(server, sid, "And what language do they speak there?", max_tokens=30).json()
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 10  # the first turn is in it
    stored = call(server, "GET", f"/v1/sessions/{sid}").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    assert stored["messages"][1]["content"] == first["choices"][0]["message"]["content"]
    assert stored["messages"][3]["content"] == second["choices"][0]["message"]["content"]
    assert stored["title"] == "Name the capital city of France."
    streamed = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Thanks!"}],
            "session_id": sid,
            "stream": True,
            "temperature": 0,
            "max_tokens": 12,
        },
        headers=auth(KEYS[0]),
        timeout=60,
    )
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    )
    after = call(server, "GET", f"/v1/sessions/{sid}").json()["messages"]
    assert len(after) == 6 and after[-1]["content"] == text
    assert turn(server, sid, "hi", n=2).status_code == 400  # one reply to keep


def test_a_long_history_is_trimmed_oldest_first_keeping_the_system_prompt(server: Server) -> None:
    sid = call(server, "POST", "/v1/sessions", {}).json()["id"]
    body = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "word " * 300 + "Count the words."},
        ],
        "session_id": sid,
        "temperature": 0,
        "max_tokens": 8,
    }
    assert call(server, "POST", "/v1/chat/completions", body).status_code == 200
    for _ in range(3):  # each turn alone is ~310 tokens; the context is 1024
        assert turn(server, sid, "word " * 300 + "Again.", max_tokens=8).status_code == 200
    stored = call(server, "GET", f"/v1/sessions/{sid}").json()["messages"]
    assert len(stored) == 2 + 1 + 2 * 3  # everything is kept in the store ...
    last = turn(server, sid, "Short question?", max_tokens=8).json()
    assert last["usage"]["prompt_tokens"] + 8 <= 1024  # ... and the prompt left the oldest turns out


def test_a_cancelled_turn_is_not_kept(server: Server) -> None:
    sid = call(server, "POST", "/v1/sessions", {}).json()["id"]
    body = {
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "session_id": sid,
        "stream": True,
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=auth(KEYS[0])) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break  # the client leaves mid-reply
    assert call(server, "GET", f"/v1/sessions/{sid}").json()["messages"] == []
    failed = turn(server, sid, "word " * 1200)  # longer than the context alone: refused, nothing kept
    assert failed.status_code == 400 and failed.json()["error"]["code"] == "context_length_exceeded"
    assert call(server, "GET", f"/v1/sessions/{sid}").json()["messages"] == []


def test_concurrent_turns_on_one_session_never_interleave(server: Server) -> None:
    sid = call(server, "POST", "/v1/sessions", {}).json()["id"]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=auth(KEYS[0]), timeout=120) as client:
            bodies = [
                {
                    "messages": [{"role": "user", "content": f"Turn {i}: name a fruit."}],
                    "session_id": sid,
                    "max_tokens": 20,
                    "temperature": 0,
                }
                for i in range(4)
            ]
            return list(await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies)))

    responses = asyncio.run(together())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 409} and 200 in codes and 409 in codes
    assert all(r.json()["error"]["code"] == "session_conflict" for r in responses if r.status_code == 409)
    kept = [r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200]
    stored = call(server, "GET", f"/v1/sessions/{sid}").json()["messages"]
    assert len(stored) == 2 * len(kept)
    for user, assistant in zip(stored[::2], stored[1::2], strict=True):  # each turn whole, in pairs
        assert user["role"] == "user" and assistant["role"] == "assistant"
    assert sorted(m["content"] for m in stored[1::2]) == sorted(kept)


def test_a_session_survives_a_restart_and_a_kill_mid_turn(tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    env = {"FNSERVE_SESSION_STORE": f"sqlite:///{db}"}
    with running_server(tmp_path / "first.log", env) as server:
        sid = httpx.post(f"{server.url}/v1/sessions", json={}).json()["id"]
        body = {"messages": [{"role": "user", "content": "Hi!"}], "session_id": sid, "max_tokens": 8}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        before = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
        long = {
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "session_id": sid,
            "stream": True,
            "max_tokens": 500,
            "ignore_eos": True,
        }
        started = threading.Event()

        def stream() -> None:
            try:
                with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=60) as r:
                    for line in r.iter_lines():
                        if '"content"' in line:
                            started.set()
            except httpx.HTTPError:
                pass  # the server dies under it

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        reader.join(30)
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    again = launch(tmp_path / "second.log", env)
    try:
        wait_until(again)
        assert httpx.get(f"{again.url}/v1/sessions/{sid}").json() == before
        assert httpx.post(f"{again.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        again.stop()
