"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright, against the real server.

Screenshots go to tests/artifacts/ (ignored by git; CI keeps what a run leaves there).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.ui import STATIC

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
XSS = 'Here: <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script> **bold**'


def test_the_vendored_libraries_are_the_recorded_ones() -> None:
    """Each file taken from npm has the sha256 recorded when it was fetched, and its licence is kept."""
    versions = json.loads((STATIC / "vendor" / "VERSIONS.json").read_text())
    assert set(versions) == {"marked", "dompurify", "@highlightjs/cdn-assets"}
    for package, entry in versions.items():
        folder = STATIC / "vendor" / package.split("/")[-1]
        assert any(name.startswith("LICENSE") for name in entry["files"])
        for name, digest in entry["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def stored_answer(server_url: str, title: str, answer: str) -> str:
    """A session whose first answer is `answer`: a turn may carry earlier messages, the assistant's included."""
    sid = str(httpx.post(f"{server_url}/v1/sessions", json={"title": title}).json()["id"])
    messages = [
        {"role": "user", "content": "Show me."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Thanks."},
    ]
    turn = {"session_id": sid, "max_tokens": 2, "messages": messages}
    assert httpx.post(f"{server_url}/v1/chat/completions", json=turn, timeout=60).status_code == 200
    return sid


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server of this module's own, so its sessions list holds only what these tests make."""
    from tests.servers import running_server

    folder = tmp_path_factory.mktemp("page")
    env = {"FNSERVE_SESSION_STORE": f"sqlite:///{folder / 'sessions.db'}", "FNSERVE_MAX_MODEL_LEN": "2048"}
    with running_server(folder / "fnserve.log", env) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)  # answers stream on a CPU, maybe a busy one: waits are for events, not speed
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_chatting_in_the_browser(browser: object, server_url: str) -> None:
    from playwright.sync_api import Browser, Page, expect

    assert isinstance(browser, Browser)
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context()
    page: Page = context.new_page()
    foreign: list[str] = []
    page.on(
        "request",
        lambda r: (
            foreign.append(r.url) if not r.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:")) else None
        ),
    )
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    assert httpx.get(f"{server_url}/", follow_redirects=False).headers["location"] == "/ui/"
    page.goto(f"{server_url}/")
    expect(page.locator("#connection")).to_have_text("connected")
    expect(page.locator("#model option")).to_have_count(1)  # the chat models from /v1/models
    page.click("#settings-toggle")
    page.fill("#temperature", "0")  # greedy, so the answer is known
    page.locator("#temperature").dispatch_event("change")
    page.click("#settings-toggle")

    # Send a message and watch the answer stream in.
    page.fill("#input", "Name the capital city of France.")
    page.keyboard.press("Enter")
    expect(page.locator(".message.user")).to_have_text("Name the capital city of France.")
    expect(page.locator(".message.assistant").last).to_contain_text("Paris", timeout=30_000)
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#speed")).to_contain_text("tok/s")
    expect(page.locator("#sessions li")).to_have_count(1)
    expect(page.locator("#sessions li .title").first).to_have_text("Name the capital city of France.")
    first_session = page.evaluate("JSON.parse(localStorage.getItem('fnserve.session'))")
    page.screenshot(path=str(ARTIFACTS / "chat-answer.png"))

    # Stop an answer mid-stream.
    page.locator("#max_tokens").evaluate("e => { e.value = 400; e.dispatchEvent(new Event('change')); }")
    page.fill("#input", "Write a very long story about a lighthouse keeper.")
    page.keyboard.press("Enter")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(".message.assistant").nth(1)).to_have_text(re.compile(r"\w+ \w+ \w+ \w+"))
    page.click("#stop")
    expect(page.locator(".message.assistant").last).to_contain_text("Stopped", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "chat-stopped.png"))

    # A new chat, then back to the first: its history comes from the server.
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    page.fill("#input", "Name a colour.")
    page.keyboard.press("Enter")
    expect(page.locator("#sessions li")).to_have_count(2, timeout=30_000)
    expect(page.locator("#send")).to_be_visible(timeout=30_000)

    # Edit and resend the last message: the turn it replaces leaves the session.
    page.locator(".message.user .edit").click()
    expect(page.locator("#input")).to_have_value("Name a colour.")
    page.fill("#input", "Name a fruit.")
    page.keyboard.press("Enter")
    expect(page.locator(".message.user")).to_have_count(1)
    expect(page.locator(".message.user")).to_contain_text("Name a fruit.")
    expect(page.locator("#send")).to_be_visible(timeout=30_000)
    second = page.evaluate("JSON.parse(localStorage.getItem('fnserve.session'))")
    stored = httpx.get(f"{server_url}/v1/sessions/{second}").json()["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["Name a fruit."]
    page.locator("#sessions li .title", has_text="Name the capital city of France.").click()
    expect(page.locator(".message.user")).to_have_count(1)  # the stopped turn was not kept
    expect(page.locator(".message.assistant")).to_contain_text("Paris")

    # Reload: the same chat, from the server.
    page.reload()
    expect(page.locator(".message.assistant").first).to_contain_text("Paris")
    assert page.evaluate("JSON.parse(localStorage.getItem('fnserve.session'))") == first_session

    # Dark mode, kept across a reload.
    page.click("#theme")
    assert page.evaluate("document.documentElement.classList.contains('dark')")
    page.reload()
    assert page.evaluate("document.documentElement.classList.contains('dark')")
    page.screenshot(path=str(ARTIFACTS / "chat-dark.png"))

    # An answer holding HTML and a script shows them as text; nothing in it runs.
    stored_answer(server_url, "untrusted", XSS)
    page.reload()
    page.locator("#sessions li .title", has_text="untrusted").click()
    reply = page.locator(".message.assistant").first
    expect(reply).to_contain_text('<img src=x onerror="window.__xss=1">')
    expect(reply).to_contain_text("<script>window.__xss=2</script>")
    expect(reply.locator("strong")).to_have_text("bold")  # Markdown still renders
    assert reply.locator("img, script").count() == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    page.screenshot(path=str(ARTIFACTS / "chat-untrusted.png"))

    assert foreign == [], foreign  # nothing from a CDN or anywhere else
    assert errors == [], errors
    context.close()


def test_a_stopped_answer_keeps_its_note_over_a_pending_paint(browser: object, server_url: str) -> None:
    """Streamed text is painted on the next animation frame; a stop that lands before it must not be painted
    over. Frames are slowed to 400 ms here, so a paint is pending whenever the stop's reply comes."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    context = browser.new_context()
    context.add_init_script(
        "window.requestAnimationFrame = (f) => setTimeout(() => f(performance.now()), 400);"
        "window.cancelAnimationFrame = (id) => clearTimeout(id);"
    )
    page = context.new_page()
    page.goto(f"{server_url}/ui/")
    expect(page.locator("#connection")).to_have_text("connected")
    page.locator("#max_tokens").evaluate("e => { e.value = 400; e.dispatchEvent(new Event('change')); }")
    page.fill("#input", "Write a very long story about a lighthouse keeper.")
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_text(re.compile(r"\w+ \w+ \w+ \w+"))
    page.click("#stop")
    expect(reply).to_contain_text("Stopped")
    page.wait_for_timeout(1000)  # past any paint that was pending
    expect(reply).to_contain_text("Stopped")
    context.close()


def test_code_blocks_are_highlighted_with_a_copy_button(browser: object, server_url: str) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    sid = stored_answer(server_url, "code", "Try this:\n\n```python\ndef add(a, b):\n    return a + b\n```\n")
    context = browser.new_context()
    context.add_init_script(f"localStorage.setItem('fnserve.session', JSON.stringify({json.dumps(sid)}))")
    page = context.new_page()
    page.goto(f"{server_url}/ui/")
    block = page.locator(".message.assistant pre").first
    expect(block.locator("code .hljs-keyword").first).to_have_text("def")
    expect(block.locator("button.copy")).to_have_text("Copy")
    context.close()


def test_a_server_with_keys_asks_for_one_and_rate_limits_show(browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import Browser, expect

    from tests.servers import running_server

    assert isinstance(browser, Browser)
    key = "sk-browser-0123456789"
    env = {
        "FNSERVE_API_KEYS": json.dumps([key]),
        "FNSERVE_SESSION_STORE": f"sqlite:///{tmp_path / 'sessions.db'}",
        "FNSERVE_RATE_LIMIT_REQUESTS": "6",
    }
    with running_server(tmp_path / "fnserve.log", env) as server:
        page = browser.new_page()
        page.goto(f"{server.url}/ui/")
        expect(page.locator("#banner")).to_contain_text("API key")
        expect(page.locator("#settings")).to_be_visible()
        page.fill("#api-key", key)
        page.locator("#api-key").dispatch_event("change")
        expect(page.locator("#banner")).to_be_hidden()
        expect(page.locator("#model option")).to_have_count(1)
        page.fill("#max_tokens", "4")  # short answers: 7 messages fit in a minute on the slowest CPU
        page.locator("#max_tokens").dispatch_event("change")
        # Past 6 requests a minute. The limiter's sliding-window counter weighs the last minute's count by how much
        # of it is left, so a burst that a minute's boundary cuts may pass 6 before it is refused; 7 more messages
        # after the boundary exceed the limit on the new minute's count alone.
        for _ in range(16):
            answered = page.locator(".message.assistant").count() + 1  # before Enter: the page may add it at once
            page.fill("#input", "Hi")
            page.keyboard.press("Enter")
            for _ in range(600):  # until this answer ends or the banner shows (the page's CSP forbids eval)
                ended = page.locator(".message.assistant").count() >= answered and page.locator("#send").is_visible()
                if page.locator("#banner").is_visible() or ended:
                    break
                page.wait_for_timeout(50)
            if page.locator("#banner").is_visible():
                break
        expect(page.locator("#banner")).to_contain_text("Rate limited")
        page.screenshot(path=str(ARTIFACTS / "chat-rate-limited.png"))
        page.close()


def test_the_sidebar_renames_exports_and_deletes(browser: object, server_url: str) -> None:
    from playwright.sync_api import Browser, Dialog, expect

    assert isinstance(browser, Browser)
    sid = httpx.post(f"{server_url}/v1/sessions", json={"title": "sidebar"}).json()["id"]
    turn = {"session_id": sid, "max_tokens": 4, "messages": [{"role": "user", "content": "Hello sidebar"}]}
    assert httpx.post(f"{server_url}/v1/chat/completions", json=turn, timeout=60).status_code == 200
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    answers = iter(["Renamed chat", None])

    def answer(dialog: Dialog) -> None:
        if dialog.type == "prompt":
            dialog.accept(next(answers))
        else:
            dialog.accept()  # the delete confirmation

    page.on("dialog", answer)
    page.goto(f"{server_url}/ui/")
    row = page.locator("#sessions li", has_text="sidebar")
    row.get_by_role("button", name="Rename sidebar").click()
    expect(page.locator("#sessions li", has_text="Renamed chat")).to_have_count(1)
    assert httpx.get(f"{server_url}/v1/sessions/{sid}").json()["title"] == "Renamed chat"
    with page.expect_download() as download:
        page.locator("#sessions li", has_text="Renamed chat").get_by_role("button", name="Export Renamed chat").click()
    text = Path(download.value.path()).read_text()
    assert text.startswith("# Renamed chat") and "Hello sidebar" in text
    page.locator("#sessions li", has_text="Renamed chat").get_by_role("button", name="Delete Renamed chat").click()
    expect(page.locator("#sessions li", has_text="Renamed chat")).to_have_count(0)
    assert httpx.get(f"{server_url}/v1/sessions/{sid}").status_code == 404
    context.close()
