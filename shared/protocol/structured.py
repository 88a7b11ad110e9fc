"""Structured outputs and tools in a request: `response_format`, `tools`, `tool_choice`, `parallel_tool_calls`.

What a request asks for becomes a grammar (llguidance's text) that constrained decoding enforces; every check of
these fields is here, each failure a 400 that names its field. Tool calls are written in SmolLM2's own
function-calling format (docs/structured-outputs.md):

    <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import InvalidRequestError
from shared.settings import Settings

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
Choice = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def definition(self) -> dict[str, Any]:
        """The function as OpenAI's API and chat templates describe it."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolPlan:
    """The tools a request offers and what the model may do with them."""

    tools: tuple[Tool, ...]
    choice: Choice
    named: str | None = None  # the function tool_choice names
    parallel: bool = True

    @property
    def calls_allowed(self) -> bool:
        return self.choice != "none"

    def grammar(self) -> str | None:
        """Lark for the reply: a call (required, named), a call or text that does not start one (auto)."""
        if self.choice == "none":
            return None
        from shared.generation.constraint import inline_json

        offered = [t for t in self.tools if self.named in (None, t.name)]
        # A tool's own references ("#/$defs/...", what pydantic writes for nested models) point into its
        # parameters: those that have any are moved under the calls schema's $defs, their references with them.
        defs = {}
        for i, t in enumerate(offered):
            if (moved := _moved(t.parameters, f"/$defs/tool{i}")) != t.parameters:
                defs[f"tool{i}"] = moved
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    "arguments": {"$ref": f"#/$defs/tool{i}"} if f"tool{i}" in defs else t.parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, t in enumerate(offered)
        ]
        one = len(items) == 1
        calls: dict[str, Any] = {"type": "array", "items": items[0] if one else {"anyOf": items}, "minItems": 1}
        if defs:
            calls["$defs"] = defs
        if not self.parallel or self.choice == "named":
            calls["maxItems"] = 1
        call = f"call: {json.dumps(CALL_START)} calls {json.dumps(CALL_END)}\ncalls: {inline_json(calls)}\n"
        if self.choice in ("required", "named"):
            return "start: call\n" + call
        # auto: a reply that starts with the call marker is a call, any other reply is text.
        return "start: call | TEXT | \n" + call + f"TEXT: /{_not_starting_with(CALL_START)}(.|\\n)*/\n"


_DATA = ("const", "enum", "default", "examples")  # keywords whose values are JSON data, not schemas


def _moved(schema: Any, base: str) -> Any:
    """`schema` as it reads at the JSON pointer `base` of another document: each local reference "#/x" becomes
    "#<base>/x" (and "#" itself "#<base>")."""
    if isinstance(schema, list):
        return [_moved(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in _DATA else _moved(value, base) for key, value in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = "#" + base + ref[1:]
    return out


def _not_starting_with(marker: str) -> str:
    """A regex for text whose start is not `marker` (nor a prefix of it, followed by more)."""
    alternatives = [re.escape(marker[:i]) + "[^" + re.escape(marker[i]) + "]" for i in range(len(marker))]
    return "(" + "|".join(alternatives) + ")"


def response_format_grammar(raw: dict[str, Any] | None, limits: Settings) -> str | None:
    """The grammar of `response_format`, or None for text. 400 (param response_format) for what is not valid."""
    if raw is None:
        return None
    kind = raw.get("type", "text")
    if kind == "text":
        return None
    from shared.generation.constraint import json_grammar

    if kind == "json_object":
        return json_grammar({"type": "object"})
    if kind != "json_schema":
        raise _format_error(f"type {kind!r} is not one of 'text', 'json_object', 'json_schema'")
    spec = raw.get("json_schema")
    if not isinstance(spec, dict):
        raise _format_error("json_schema must be an object with 'name' and 'schema'")
    if not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
        raise _format_error("json_schema.name must be 1-64 letters, digits, '_' or '-'")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _format_error("json_schema.schema must be a JSON Schema object")
    _check_size(schema, "response_format", limits)
    return json_grammar(closed(schema) if _strict(spec, "response_format", "json_schema.strict") else schema)


# Keywords whose values are schemas: one, a list of them, or a map of names to them (JSON Schema 2020-12).
_ONE = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "contains",
        "propertyNames", "not", "if", "then", "else")  # fmt: skip
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that lists `properties` and says
    nothing of other keys: what `strict: true` means in OpenAI's API (its strict mode requires it written out).
    An object schema without `properties` (any object) stays open, as does one that allows other keys."""
    if isinstance(schema, list):  # items as a list (draft 4-7)
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if key in out:
            out[key] = closed(out[key])
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    if "properties" in out and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & set(out):
        out["additionalProperties"] = False
    return out


def _strict(spec: dict[str, Any], param: str, where: str) -> bool:
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{where} must be true or false", param=param)
    return bool(strict)


def tool_plan(
    tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None, limits: Settings
) -> ToolPlan | None:
    """The request's tools and tool_choice, checked; None when it offers none."""
    if tools is None:
        if tool_choice is not None and tool_choice != "none":
            raise InvalidRequestError("tool_choice is set but tools is not", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools must be a non-empty array; leave it out for none", param="tools")
    parsed = tuple(_tool(t, i) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools holds two functions with the same name", param="tools")
    _check_size([t.definition() for t in parsed], "tools", limits)
    choice: Choice
    named = None
    if tool_choice is None or tool_choice == "auto":
        choice = "auto"
    elif tool_choice in ("none", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if not isinstance(named, str):
            raise InvalidRequestError("tool_choice.function.name must be a string", param="tool_choice")
        if named not in names:
            raise InvalidRequestError(f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
        choice = "named"
    else:
        raise InvalidRequestError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    return ToolPlan(parsed, choice, named, parallel_tool_calls is not False)


def _tool(raw: Any, index: int) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("function"), dict):
        raise InvalidRequestError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", param="tools")
    function = raw["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", param="tools")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise InvalidRequestError(f"{where}.function.description must be a string", param="tools")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequestError(f"{where}.function.parameters must be a JSON Schema of an object", param="tools")
    if _strict(function, "tools", f"{where}.function.strict"):
        parameters = closed(parameters)
    return Tool(name, description, {"type": "object", **parameters})


def _check_size(value: Any, param: str, limits: Settings) -> None:
    size = len(json.dumps(value))
    if size > limits.max_schema_bytes:
        raise InvalidRequestError(
            f"{param} is {size} bytes as JSON; the limit is {limits.max_schema_bytes} (max_schema_bytes)", param=param
        )


def _format_error(message: str) -> InvalidRequestError:
    return InvalidRequestError(f"response_format {message}", param="response_format")


@dataclass
class Call:
    """A tool call as written so far: its name, then its arguments' JSON text (complete once closed)."""

    name: str
    arguments: str
    complete: bool


def split_calls(text: str) -> list[Call] | None:
    """The calls in a reply written in the call format, as far as written; None when the reply is not a call.

    The grammar fixes the layout (`{"name": "...", "arguments": {...}}` items, ", " between them), so a call
    shows here once its name is whole, and its arguments grow by what each token adds: streamed deltas and
    the collected reply come from this one function.
    """
    if not text.startswith(CALL_START + "["):
        return None
    body, pos, calls = text, len(CALL_START) + 1, []
    head, middle = '{"name": "', '", "arguments": '
    while body.startswith(head, pos):
        start = pos + len(head)
        end = body.find('"', start)  # names hold no quotes or escapes
        if end < 0:
            break
        if not body.startswith(middle, end):
            calls.append(Call(body[start:end], "", False))
            break
        args = end + len(middle)
        close = _json_end(body, args)
        calls.append(Call(body[start:end], body[args:close], close is not None))
        if close is None or not body.startswith("}, ", close):
            break
        pos = close + 3
    return calls


def _json_end(text: str, start: int) -> int | None:
    """The index just past the JSON value that starts at `start`, or None if it is not closed yet."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None
