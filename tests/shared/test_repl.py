"""The interactive `fnserve chat`, driven through a pseudo-terminal against the real server."""

from __future__ import annotations

import os
import time

import httpx
import pexpect

from tests.servers import FNSERVE


def spawn(server_url: str, *args: str) -> pexpect.spawn:
    env = {**os.environ, "FNSERVE_URL": f"{server_url}/v1"}
    child = pexpect.spawn(str(FNSERVE), ["chat", "--temperature", "0", *args], env=env, encoding="utf-8", timeout=60)
    child.expect("/help for commands")
    return child


def cancelled(server_url: str) -> int:
    return int(httpx.get(f"{server_url}/health").json()["models"]["smollm2-135m-instruct"]["cancelled"])


def test_two_turns_reset_and_ctrl_c_during_an_answer(server_url: str) -> None:
    child = spawn(server_url)
    child.expect("> ")
    child.sendline("Name the capital city of France.")
    child.expect("Paris")
    child.expect("> ")
    child.sendline("/system You answer in one word.")
    child.expect(r"\(system prompt set\)")
    child.sendline("And what is the capital of Italy?")
    child.expect("> ")
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    before = cancelled(server_url)
    child.sendline("Write a very long story about a dragon, with many chapters.")
    child.expect_exact("chapters.\r\n")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+")  # the answer has started
    child.sendintr()  # Ctrl-C
    child.expect(r"\(stopped\)")
    child.expect("> ")
    deadline = time.monotonic() + 10
    while cancelled(server_url) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled(server_url) == before + 1  # the server stopped generating it
    child.sendline("Name the capital city of France.")  # still running, and the stopped turn was not kept
    child.expect("Paris")
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_stored_session_is_continued(server_url: str) -> None:
    sid = httpx.post(f"{server_url}/v1/sessions", json={}).json()["id"]
    child = spawn(server_url, "--session", sid)
    child.expect("> ")
    child.sendline("Name the capital city of France.")
    child.expect("Paris")
    child.expect("> ")
    child.sendline("Thanks!")
    child.expect("> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    stored = httpx.get(f"{server_url}/v1/sessions/{sid}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[2]["content"] == "Thanks!"
    again = spawn(server_url, "--session", sid)
    assert "4 messages so far" in (again.before or "")
    again.sendline("/exit")
    again.expect(pexpect.EOF)
