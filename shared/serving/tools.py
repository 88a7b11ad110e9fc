"""Tools in the prompt and tool calls in the reply: the conversation as the chat template takes it, and a reply's
text turned into `tool_calls`, collected or streamed (both from `split_calls`, so they agree)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from shared.protocol.chat import ChatFinishReason, ChatMessage, FunctionCall, ToolCall
from shared.protocol.structured import CALL_END, CALL_START, ToolPlan, split_calls

# For templates without tools: SmolLM2's function-calling format (its tools in a system turn, calls as a JSON
# list between <tool_call> tags), in this project's words.
TOOLS_PROMPT = """You can call functions. These are the functions, described in JSON:
<tools>{tools}</tools>

To call functions, answer with the calls only, in exactly this format:
<tool_call>[{{"name": "function_name", "arguments": {{"argument_name": "value"}}}}]</tool_call>
If none of the functions fits, answer in plain text instead."""


def template_messages(
    messages: list[ChatMessage], plan: ToolPlan | None, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation for the chat template, and the tools to pass it (templates that render tools themselves).

    developer is OpenAI's newer name for system. Without native tools, the tool list goes into the system turn,
    an assistant's earlier calls are written in the call format, and tool results stay `tool` turns.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            if native:
                entry["tool_calls"] = [
                    {"type": "function", "function": {"name": c.function.name, "arguments": _loads(c.function)}}
                    for c in m.tool_calls
                ]
            else:
                entry["content"] = (entry["content"] + "\n" if entry["content"] else "") + _written(m.tool_calls)
        if m.role == "tool" and m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    if plan is None or not plan.calls_allowed:
        return out, None
    definitions = [{"type": "function", "function": t.definition()} for t in plan.tools]
    if native:
        return out, definitions
    prompt = TOOLS_PROMPT.format(tools=json.dumps([t.definition() for t in plan.tools]))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": prompt + "\n\n" + out[0]["content"]}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _loads(function: FunctionCall) -> Any:
    try:
        return json.loads(function.arguments)
    except json.JSONDecodeError:
        return function.arguments


def _written(calls: list[ToolCall]) -> str:
    items = ", ".join(f'{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}' for c in calls)
    return f"{CALL_START}[{items}]{CALL_END}"


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def reply(text: str, plan: ToolPlan | None) -> tuple[str | None, list[ToolCall] | None]:
    """A collected reply's content and tool calls: calls (content null) when it is written as calls."""
    calls = split_calls(text) if plan is not None and plan.calls_allowed else None
    if not calls:
        return text, None
    return None, [ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def finish(reason: str | None, plan: ToolPlan | None, has_calls: bool) -> ChatFinishReason | None:
    """OpenAI's finish_reason: tool_calls when auto or required ended in calls, stop for a named tool."""
    if reason not in ("stop", "length"):
        return None
    if reason == "stop" and has_calls and plan is not None and plan.choice != "named":
        return "tool_calls"
    return "stop" if reason == "stop" else "length"


@dataclass
class StreamedCalls:
    """One choice's streamed reply when calls are allowed: text that may still become a call is held back until
    it either is one (then deltas of calls) or is not (then content); calls stream as split_calls sees them."""

    plan: ToolPlan
    text: str = ""
    decided: bool = False
    is_call: bool = False
    ids: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # characters of each call's arguments sent

    def add(self, text: str, last: bool) -> tuple[str | None, list[dict[str, Any]] | None]:
        """What this step's text adds: content, or tool-call deltas. `last`: the choice has ended."""
        self.text += text
        if not self.decided:
            if self.text.startswith(CALL_START + "["):
                self.decided = self.is_call = True
            elif not CALL_START.startswith(self.text) and not (CALL_START + "[").startswith(self.text):
                self.decided = True
                return self.text, None
            elif not last:
                return None, None  # still a prefix of the call marker: held back
            else:
                return self.text, None
        if not self.is_call:
            return text, None
        calls = split_calls(self.text) or []
        if not calls:
            return (self.text, None) if last else (None, None)
        deltas = []
        for i, c in enumerate(calls):
            if i == len(self.ids):
                self.ids.append(call_id())
                self.sent.append(0)
                deltas.append(
                    {"index": i, "id": self.ids[i], "type": "function", "function": {"name": c.name, "arguments": ""}}
                )
            if len(c.arguments) > self.sent[i]:
                deltas.append({"index": i, "function": {"arguments": c.arguments[self.sent[i] :]}})
                self.sent[i] = len(c.arguments)
        return None, deltas or None

    @property
    def has_calls(self) -> bool:
        return bool(self.ids)
