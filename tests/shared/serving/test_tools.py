"""A reply's tool calls, collected or streamed in any pieces, come out the same; prompts carry the tools."""

from __future__ import annotations

import copy
import json

import pytest

from shared.generation.model import GenerationModel
from shared.protocol.chat import ChatMessage
from shared.protocol.structured import ToolPlan, tool_plan
from shared.serving.tools import StreamedCalls, reply, template_messages
from shared.settings import Settings

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "now"}},
]
CALLS = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "n": [1, {"x": "}"}]}}, {"name": "now", "arguments": {}}]</tool_call>'  # noqa: E501


def plan(choice: str = "auto") -> ToolPlan:
    made = tool_plan(TOOLS, choice, None, Settings(preload=[]))
    assert made is not None
    return made


def streamed(pieces: list[str], p: ToolPlan) -> tuple[str | None, list[tuple[str, str]]]:
    state = StreamedCalls(p)
    content: str | None = None
    calls: dict[int, list[str]] = {}
    for i, piece in enumerate(pieces):
        text, deltas = state.add(piece, last=i == len(pieces) - 1)
        if text is not None:
            content = (content or "") + text
        for d in deltas or []:
            if "id" in d:
                assert d["index"] not in calls and d["function"]["arguments"] == ""
                calls[d["index"]] = [d["function"]["name"], ""]
            else:
                assert set(d) == {"index", "function"}
                calls[d["index"]][1] += d["function"]["arguments"]
    return content, [(name, args) for name, args in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize(
    "text", [CALLS, "Plain text with {json}", "<tool", "", '<tool_call>[{"name": "get_w', "<b>bold</b>"]
)
def test_streamed_in_any_two_pieces_equals_the_collected_reply(text: str) -> None:
    content, calls = reply(text, plan())
    want = (content, [(c.function.name, c.function.arguments) for c in calls or []])
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]], plan()) == want, cut
    assert streamed(list(text) or [""], plan()) == want  # a character a step


def test_a_reply_written_as_calls_has_null_content_and_the_calls() -> None:
    content, calls = reply(CALLS, plan())
    assert content is None and calls is not None
    assert [c.function.name for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0].function.arguments) == {"city": 'Pa"ris', "n": [1, {"x": "}"}]}
    assert calls[1].function.arguments == "{}"
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    assert reply(CALLS, plan("none")) == (CALLS, None)  # with tool_choice none the text is only text


def test_templates_without_tools_get_them_in_the_system_turn_and_calls_in_the_format() -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather?"),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}],
            }
        ),
        ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
    ]
    out, tools = template_messages(messages, plan(), native=False)
    assert tools is None
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert out[0]["content"].endswith("Be brief.")
    assert out[2]["content"] == '<tool_call>[{"name": "get_weather", "arguments": {"city": "Rome"}}]</tool_call>'
    assert out[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    native, definitions = template_messages(messages, plan(), native=True)
    assert definitions and definitions[0]["function"]["name"] == "get_weather"
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert template_messages(messages, plan("none"), native=False)[0][0]["content"] == "Be brief."


def test_a_template_that_renders_tools_gets_them_and_earlier_calls_as_objects(smol: GenerationModel) -> None:
    """A chat template that lays out `tools` itself (as Qwen's and Llama 3's do) receives them from fnserve."""
    template = (
        "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}\n"
        "{% endfor %}assistant:"
    )
    tokenizer = copy.deepcopy(smol.tokenizer)
    tokenizer.chat_template = template
    messages = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}],
            }
        ),
    ]
    conversation, tools = template_messages(messages, plan(), native="tools" in template)
    text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False)  # type: ignore[arg-type]
    assert "TOOLS: get_weather now" in text and "CALL get_weather Rome" in text
