"""Structured outputs and tool calls end to end: the real server process, the official openai client and
LangChain, on the embedded SmolLM2. Every reply is checked against its schema, whatever the model chose."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import BaseModel, ConfigDict, Field

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},  # no arguments
    },
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]


class Colour(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties false: a schema without it lets keys run on

    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=150)
    favourite_colour: Colour
    nickname: str | None = Field(max_length=20)
    home: Address
    hobbies: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)  # every bound: a Person fits 400 tokens


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def schema_of(tool: ChatCompletionToolParam) -> dict[str, Any]:
    return dict(tool["function"].get("parameters") or {})


def calls_of(message: Any) -> list[tuple[str, str]]:
    """A reply's function calls as (name, arguments)."""
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)])
def test_the_sdk_parses_a_pydantic_model(client: OpenAI, temperature: float, seed: int | None) -> None:
    """Nested objects, an enum, an optional field and an array, at temperature 0 and 1: always a Person."""
    completion = client.chat.completions.parse(
        model="default",
        messages=[{"role": "user", "content": "Describe a person who lives in Paris."}],
        response_format=Person,
        temperature=temperature,
        seed=seed,
        max_tokens=400,
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    assert completion.choices[0].finish_reason == "stop"


def test_a_cut_reply_raises_the_sdks_length_error(client: OpenAI) -> None:
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="default", messages=ASK, response_format=Person, max_tokens=5)


def test_json_object_replies_always_load(client: OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Tell me about cats, as JSON."}],
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            max_tokens=300,
        )
        choice = reply.choices[0]
        content = choice.message.content or ""
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
        else:  # cut by max_tokens: still one line of JSON, never runaway whitespace between its tokens
            assert "\n" not in content and "  " not in outside_strings(content)


def outside_strings(text: str) -> str:
    """The characters of a JSON text (or the start of one) that are not inside its strings."""
    outside, in_string, escaped = [], False, False
    for char in text:
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char == '"':
            in_string = True
        else:
            outside.append(char)
    return "".join(outside)


def test_n_two_choices_each_validate_against_the_schema(client: OpenAI) -> None:
    schema = Person.model_json_schema()
    reply = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        n=2,
        seed=5,
        temperature=1.0,
        max_tokens=400,
    )
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


OPEN_PERSON: dict[str, object] = {  # as a hand-written schema often is: nothing said of other keys
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "job": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30}}, "required": ["title"]},
    },
    "required": ["name", "job"],
}


def test_a_strict_schema_gets_only_its_own_keys(client: OpenAI) -> None:
    """strict: true holds a reply to the keys the schema lists, at every level, as OpenAI's strict mode does
    (where the schema must say additionalProperties: false); without strict, JSON Schema's open objects."""
    for seed in range(4):
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Describe a person with a name, an age, a city and a job."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": OPEN_PERSON, "strict": True},
            },
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        person = json.loads(choice.message.content or "")
        assert set(person) == {"name", "job"} and set(person["job"]) == {"title"}, person


def test_a_strict_tools_arguments_get_only_its_own_keys(client: OpenAI) -> None:
    tool: ChatCompletionToolParam = {
        "type": "function",
        "function": {"name": "save_person", "parameters": OPEN_PERSON, "strict": True},
    }
    for seed in range(4):
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Save a person with a name, an age, a city and a job."}],
            tools=[tool],
            tool_choice="required",
            parallel_tool_calls=False,  # one call, which the schema's bounds fit in max_tokens; at temperature 1
            temperature=1.0,  # the model may otherwise call again and again
            seed=seed,
            max_tokens=200,
        )
        calls = calls_of(reply.choices[0].message)
        assert calls and reply.choices[0].finish_reason == "tool_calls"
        for _, arguments in calls:
            person = json.loads(arguments)
            assert set(person) == {"name", "job"} and set(person["job"]) == {"title"}, person


def test_completions_take_a_response_format(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    reply = client.completions.create(
        model="default",
        prompt="Two plus two is",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}}},
    )
    jsonschema.validate(json.loads(reply.choices[0].text), schema)


def test_required_forces_a_valid_call(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.id.startswith("call_") and len(c.id) > 5 and c.type == "function" for c in calls)
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for name, arguments in calls_of(choice.message):
        jsonschema.validate(json.loads(arguments), schema_of(tools[name]))
    assert calls_of(choice.message)[0][0] == "get_weather" and "Paris" in calls_of(choice.message)[0][1]


def test_a_tool_whose_parameters_refer_to_their_own_definitions_is_called(client: OpenAI) -> None:
    """The openai SDK's pydantic_function_tool writes a nested model as "$ref": "#/$defs/Address"; that
    reference points into the tool's parameters, and it was a 400 ("Pointer '/$defs/Address' does not exist")."""
    tool = openai.pydantic_function_tool(Person, name="add_person", description="Store a person")
    assert "$defs" in json.dumps(tool["function"]["parameters"])
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Store Ada, 36, who likes blue, lives in London, England, and rows."}
    ]
    for choice in ("required", {"type": "function", "function": {"name": "add_person"}}):
        reply = client.chat.completions.create(  # type: ignore[call-overload]  # choice: one of two types
            model="default", messages=messages, tools=[tool, WEATHER], tool_choice=choice, temperature=0
        )
        [(name, arguments), *_] = calls_of(reply.choices[0].message)
        assert name == "add_person"
        Person.model_validate_json(arguments)  # the nested Address as its own definition says


def test_a_named_tool_is_called_and_finishes_with_stop(client: OpenAI) -> None:
    """As OpenAI does: a named tool_choice ends with finish_reason stop; its empty arguments are "{}"."""
    reply = client.chat.completions.create(
        model="default",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    [(name, arguments)] = calls_of(choice.message)
    assert name == "get_time" and choice.message.tool_calls[0].type == "function"
    assert json.loads(arguments) == {}


def test_parallel_tool_calls_false_gives_at_most_one_call(client: OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Weather in Paris, London and Rome, and the time?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
        )
        assert len(reply.choices[0].message.tool_calls or []) == 1


def test_none_and_auto_answer_in_text_without_reporting_json_in_it_as_a_call(client: OpenAI) -> None:
    """With tool_choice none the model writes text; with auto this model chooses text here, and JSON (or code)
    in that text is content, never a call."""
    for choice_name in ("none", "auto"):
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Use the get_weather function to get the weather in London."}],
            tools=[WEATHER],
            tool_choice=choice_name,
            temperature=0,
            max_tokens=60,
        )
        choice = reply.choices[0]
        assert choice.message.tool_calls is None
        assert choice.message.content and choice.finish_reason in ("stop", "length")
        if choice_name == "auto":
            assert "{" in choice.message.content  # the JSON-looking text that stayed content


def test_a_conversation_with_earlier_calls_and_results(client: OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], temperature=0)
    assert reply.choices[0].message.content
    again = client.chat.completions.create(
        model="default",
        messages=[*messages, {"role": "user", "content": "And in Rome?"}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
    )
    calls = calls_of(again.choices[0].message)
    assert calls and calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), schema_of(WEATHER))


@pytest.mark.parametrize(
    "tool_choice",
    ["required", "auto", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "auto", "named"],
)
def test_streamed_calls_and_content_equal_the_plain_reply(client: OpenAI, tool_choice: Any) -> None:
    """The SDK's stream helper accumulates the same calls (to the last brace, "{}" included), content and
    finish_reason as the plain request, under greedy decoding."""
    request: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": "What is the weather in Paris, and the time?"}],
        "tools": [WEATHER, TIME],
        "tool_choice": tool_choice,
        "temperature": 0,
        "max_tokens": 80,
    }
    plain = client.chat.completions.create(**request).choices[0]
    with client.chat.completions.stream(**request) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == plain.finish_reason
    assert streamed.message.content == plain.message.content
    assert calls_of(streamed.message) == calls_of(plain.message)
    if tool_choice != "auto":
        assert calls_of(plain.message)


def test_raw_stream_deltas_follow_openais_shape(server_url: str) -> None:
    """A call's first delta carries index, id, type, name and arguments ""; later ones only index and arguments."""
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server_url}/v1/chat/completions", json=body, timeout=60) as response:
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(f) for f in frames if f != "[DONE]"]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or []]
    first, rest = deltas[0], deltas[1:]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert rest and all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    arguments = "".join(d["function"]["arguments"] for d in rest)
    jsonschema.validate(json.loads(arguments), schema_of(WEATHER))
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert all(c["choices"][0]["delta"].get("content") is None for c in chunks[1:])


def test_langchain_structured_output_and_bound_tools(server_url: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server_url}/v1", api_key="unused", model="default", temperature=0, max_retries=0)  # type: ignore[arg-type]
    person = llm.with_structured_output(Person).invoke("Describe a person who lives in Rome.")
    assert isinstance(person, Person)
    bound = llm.bind_tools([dict(WEATHER)], tool_choice="required")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(message.tool_calls[0]["args"], schema_of(WEATHER))


BAD: list[tuple[str, dict[str, Any], str | None, str]] = [
    (
        "unsupported keyword",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "dependentRequired": {"a": ["b"]}}},
            }
        },
        "response_format",
        "dependentRequired",
    ),  # noqa: E501
    (
        "schema over the limit",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "description": "x" * 40_000}},
            }
        },
        "response_format",
        "max_schema_bytes",
    ),  # noqa: E501
    ("unknown format", {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    (
        "tool whose arguments no value matches",  # found only as the call is written, yet still the client's 400
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"a": {"$ref": "#/$defs/x"}},
                            "required": ["a"],
                            "$defs": {"x": {"$ref": "#/$defs/x"}},
                        },
                    },
                }
            ],
            "tool_choice": "required",
        },
        None,
        "no text matches it",
    ),
    (
        "schema that no value matches",  # it only refers to itself; it was a 500 at the first token
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
            }
        },
        "response_format",
        "no text matches it",
    ),
    (
        "named tool missing",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "nope",
    ),  # noqa: E501
    ("empty tools", {"tools": []}, "tools", "non-empty"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice", "tools"),
    ("malformed tool", {"tools": [{"type": "function"}]}, "tools", "tools[0]"),
    ("bad tool name", {"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "name"),
    (
        "unsupported keyword in a tool",
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "dependentRequired": {"a": ["b"]}}},
                }
            ]
        },
        "tools",
        "dependentRequired",
    ),  # noqa: E501
    ("json with tools", {"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "tools"),
    (
        "strict not a boolean",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
        "response_format",
        "strict",
    ),
]


@pytest.mark.parametrize(("case", "extra", "param", "named"), BAD, ids=[b[0] for b in BAD])
def test_what_cannot_be_honoured_is_a_400_naming_its_field(
    server_url: str, case: str, extra: dict[str, Any], param: str | None, named: str
) -> None:
    body = {"messages": ASK, **extra}
    response = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"]


def test_a_dead_end_found_while_writing_a_call_is_logged_as_the_clients_error(server_url: str) -> None:
    """The 400 of a tool whose arguments no value matches comes from the engine mid-reply; the server logs it as
    one line naming the status, not as a failure of the engine with its traceback."""
    from tests.conftest import SERVER_LOGS

    case = next(extra for name, extra, _, _ in BAD if name == "tool whose arguments no value matches")
    log = SERVER_LOGS[0]
    before = log.stat().st_size
    response = httpx.post(f"{server_url}/v1/chat/completions", json={"messages": ASK, **case}, timeout=30)
    assert response.status_code == 400, response.text
    with log.open(errors="replace") as f:
        f.seek(before)
        written = f.read()
    assert "with a 400" in written
    assert "Traceback" not in written and "generation failed" not in written
