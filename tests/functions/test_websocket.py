"""Chat over a WebSocket against the real server, with a real WebSocket client (websockets)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.servers import Server, running_server

ASK = {"messages": [{"role": "user", "content": "Name the capital city of France."}], "temperature": 0}


def ws_url(base: str, path: str = "/v1/chat/ws") -> str:
    return base.replace("http://", "ws://") + path


def frames_until_end(socket: ClientConnection) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = json.loads(socket.recv(timeout=60))
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


def engine(server_url: str) -> dict[str, int]:
    models = httpx.get(f"{server_url}/health").json()["models"]
    return dict(models["smollm2-135m-instruct"])


def test_frames_in_order_and_several_requests_on_one_connection(server_url: str) -> None:
    plain = httpx.post(f"{server_url}/v1/chat/completions", json=ASK, timeout=60).json()
    with connect(ws_url(server_url)) as socket:
        for request in (ASK, {"prompt": "Name the capital city of France.", "temperature": 0}):
            socket.send(json.dumps(request))
            frames = frames_until_end(socket)
            *deltas, done = frames
            assert deltas and all(f["type"] == "delta" for f in deltas)
            assert "".join(f["content"] for f in deltas) == plain["choices"][0]["message"]["content"]
            assert done["type"] == "done" and done["finish_reason"] == "stop"
            assert done["usage"] == plain["usage"]


def test_a_bad_request_gets_an_error_frame_and_the_connection_stays(server_url: str) -> None:
    with connect(ws_url(server_url, "/chat/ws")) as socket:
        socket.send(json.dumps({"messages": [], "temperature": 0}))
        [error] = frames_until_end(socket)
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["param"] == "messages"
        socket.send(json.dumps({**ASK, "temperature": 7}))
        assert frames_until_end(socket)[0]["error"]["param"] == "temperature"
        socket.send("not json")
        assert frames_until_end(socket)[0]["type"] == "error"
        socket.send(json.dumps({**ASK, "max_tokens": 3}))
        assert frames_until_end(socket)[-1]["finish_reason"] == "length"


def test_stop_mid_stream_cancels_and_frees_the_place(server_url: str) -> None:
    before = engine(server_url)
    with connect(ws_url(server_url)) as socket:
        long = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 500, "ignore_eos": True}
        socket.send(json.dumps(long))
        assert json.loads(socket.recv(timeout=60))["type"] == "delta"
        socket.send(json.dumps({"type": "stop"}))
        frames = frames_until_end(socket)
        assert frames[-1] == {"type": "done", "finish_reason": "cancelled", "usage": None}
        assert len(frames) < 100  # it stopped well before 500 tokens
        deadline = time.monotonic() + 10
        while engine(server_url)["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        after = engine(server_url)
        assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1
        socket.send(json.dumps({**ASK, "max_tokens": 4}))  # the connection goes on
        assert frames_until_end(socket)[-1]["type"] == "done"


def test_a_dropped_connection_frees_its_place(server_url: str) -> None:
    before = engine(server_url)
    socket = connect(ws_url(server_url))
    socket.send(
        json.dumps({"messages": [{"role": "user", "content": "Story?"}], "max_tokens": 500, "ignore_eos": True})
    )
    assert json.loads(socket.recv(timeout=60))["type"] == "delta"
    socket.close()
    deadline = time.monotonic() + 10
    while engine(server_url)["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine(server_url)["cancelled"] == before["cancelled"] + 1 and engine(server_url)["running"] == 0


KEY = "sk-websocket-0123456789"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("ws")
    env = {
        "FNSERVE_API_KEYS": json.dumps([KEY]),
        "FNSERVE_SESSION_STORE": f"sqlite:///{folder / 'sessions.db'}",
        "FNSERVE_WS_IDLE_TIMEOUT": "2",
    }
    with running_server(folder / "fnserve.log", env) as server:
        yield server


def test_keys_are_enforced_from_a_header_or_a_message(keyed: Server) -> None:
    with connect(ws_url(keyed.url)) as socket:
        socket.send(json.dumps({**ASK, "max_tokens": 2}))
        [error] = frames_until_end(socket)
        assert error["error"]["code"] == "invalid_api_key"
        socket.send(json.dumps({"type": "auth", "api_key": KEY}))  # as a browser sends it
        socket.send(json.dumps({**ASK, "max_tokens": 2}))
        assert frames_until_end(socket)[-1]["type"] == "done"
    with connect(ws_url(keyed.url), additional_headers={"Authorization": f"Bearer {KEY}"}) as socket:
        socket.send(json.dumps({**ASK, "max_tokens": 2}))
        assert frames_until_end(socket)[-1]["type"] == "done"
        socket.send(json.dumps({**ASK, "max_tokens": 2, "api_key": "sk-wrong"}))  # the header wins
        assert frames_until_end(socket)[-1]["type"] == "done"


def test_a_session_turn_over_the_socket_is_kept(keyed: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    sid = httpx.post(f"{keyed.url}/v1/sessions", json={}, headers=headers).json()["id"]
    with connect(ws_url(keyed.url, f"/v1/chat/ws?session_id={sid}"), additional_headers=headers) as socket:
        socket.send(json.dumps({**ASK, "max_tokens": 12}))
        *deltas, done = frames_until_end(socket)
        assert done["session_id"] == sid
    stored = httpx.get(f"{keyed.url}/v1/sessions/{sid}", headers=headers).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == "".join(f["content"] for f in deltas)


def test_a_silent_connection_is_closed(keyed: Server) -> None:
    with connect(ws_url(keyed.url)) as socket:
        with pytest.raises(ConnectionClosed):
            socket.recv(timeout=10)
        assert socket.close_code == 1000
