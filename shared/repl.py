"""`fnserve chat` with no prompt: an interactive conversation with a running server.

Answers stream as they come; Ctrl-C stops an answer (the server cancels it, and the unfinished turn is not kept),
never the program; Ctrl-D or /exit leaves. The conversation is kept here, or on the server with --session ID
(a stored session, continued from any machine).
"""

from __future__ import annotations

import sys
from typing import Any

HELP = """/reset         start the conversation again (a new session with --session)
/model NAME    talk to another model
/system TEXT   set the system prompt (empty: none)
/exit          leave (or Ctrl-D); Ctrl-C stops an answer"""


class Repl:
    def __init__(self, client: Any, model: str, system: str | None, options: dict[str, Any], session: str | None):
        self.client = client
        self.model = model
        self.system = system or ""
        self.options = options
        self.session = session
        self.history: list[dict[str, str]] = []

    def run(self) -> int:
        try:
            import readline  # noqa: F401 - line editing and history for input(), where the platform has it
        except ImportError:
            pass
        if self.session:
            stored = self.client.get(f"/sessions/{self.session}", cast_to=object)
            print(f"session {self.session}: {len(stored['messages'])} messages so far")
        print(f"fnserve chat with {self.model}; /help for commands")
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "exit":
                    return 0
                continue
            self.ask(line)

    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/reset":
            self.history.clear()
            if self.session:
                self.session = self.client.post("/sessions", body={}, cast_to=object)["id"]
                print(f"(new session {self.session})")
            else:
                print("(conversation cleared)")
        elif name == "/model" and rest.strip():
            self.model = rest.strip()
            print(f"(model {self.model})")
        elif name == "/system":
            self.system = rest.strip()
            print("(system prompt set)" if self.system else "(no system prompt)")
        else:
            print(HELP)
        return None

    def ask(self, text: str) -> None:
        turn = {"role": "user", "content": text}
        if self.session:
            messages = [turn]
            extra: dict[str, Any] = {"extra_body": {"session_id": self.session}}
        else:
            messages = [*self.history, turn]
            extra = {}
        if self.system and (self.session is None or not self.history):
            messages = [{"role": "system", "content": self.system}, *messages]
        answer = ""
        stream = None
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, **self.options, **extra
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # the server sees the client leave and cancels the answer
            print("\n(stopped)")
            return
        except Exception as exc:  # noqa: BLE001 - an API error is shown, and the conversation goes on
            print(f"\nerror: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return
        self.history += [turn, {"role": "assistant", "content": answer}]
