"""Chat completions: https://platform.openai.com/docs/api-reference/chat/create"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from shared.errors import InvalidRequestError
from shared.generation.params import SamplingParams
from shared.protocol.common import OpenAIModel, StreamOptions, TokenLogprob, UsageInfo
from shared.protocol.sampling import build_sampling_params
from shared.protocol.structured import ToolPlan, response_format_grammar, tool_plan
from shared.settings import Settings

Number = StrictInt | StrictFloat


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(OpenAIModel):
    name: StrictStr
    arguments: StrictStr  # JSON text, as the model wrote it


class ToolCall(OpenAIModel):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: StrictStr | None = None  # tool messages: the call this is the result of

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(
                        f"content part {i} is of type {kind!r}, but the models served here read text only: "
                        "send the message as text, or as parts of type 'text'"
                    )
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIModel):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: StrictStr = "default"
    frequency_penalty: Number | None = 0.0
    logit_bias: dict[str, Number] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    max_tokens: StrictInt | None = Field(default=None, description="deprecated by OpenAI; max_completion_tokens")
    max_completion_tokens: StrictInt | None = None
    n: StrictInt | None = 1
    presence_penalty: Number | None = 0.0
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = 1.0
    top_p: Number | None = 1.0
    tools: list[Any] | None = None
    tool_choice: Any = None
    user: StrictStr | None = None

    # --- fnserve extras (not in OpenAI's API) ---
    top_k: StrictInt | None = Field(default=None, description="sample from the k most likely tokens; 0 = off")
    min_p: Number | None = Field(default=None, description="drop tokens below min_p x the top probability")
    repetition_penalty: Number | None = Field(default=None, description="CTRL-style penalty over prompt+output")
    ignore_eos: StrictBool | None = Field(default=None, description="keep generating past end-of-sequence")
    min_tokens: StrictInt | None = Field(default=None, description="generate at least this many tokens")
    session_id: StrictStr | None = Field(
        default=None, description="continue this stored session: its history comes first, this turn is kept"
    )

    @field_validator("messages")
    @classmethod
    def _last_message_sensible(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if all(m.role in ("system", "developer") for m in messages):
            raise ValueError("messages must include at least one user or assistant message")
        return messages

    @field_validator("messages")
    @classmethod
    def _tool_messages_answer_a_call(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for m in messages:
            if m.role == "tool" and m.content is None:
                raise ValueError("a tool message must carry the tool's result as content")
            if m.tool_calls is not None and m.role != "assistant":
                raise ValueError("only assistant messages carry tool_calls")
        return messages

    def grammar(self, limits: Settings) -> tuple[ToolPlan | None, str | None, str]:
        """The request's tool plan, the grammar its reply must follow (or None), and the field it comes from."""
        plan = tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls, limits)
        text = response_format_grammar(self.response_format, limits)
        if plan is not None and plan.calls_allowed:
            if text is not None:
                raise InvalidRequestError(
                    "response_format json together with tools the model may call is not supported; "
                    "set tool_choice 'none', or leave out one of them",
                    param="response_format",
                )
            return plan, plan.grammar(), "tools"
        return plan, text, "response_format"

    def to_sampling_params(self, limits: Settings) -> SamplingParams:
        """The engine's parameters for this request, after every check of its values (400 naming the field)."""
        if len(self.messages) > limits.max_messages:
            raise InvalidRequestError(
                f"messages holds {len(self.messages)} messages; the limit is {limits.max_messages} (max_messages)",
                param="messages",
            )
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        return build_sampling_params(self, limits, max_tokens, logprobs=bool(self.logprobs), top=self.top_logprobs or 0)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None  # None, never an empty list


class ChatCompletionChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    # As OpenAI streams them: a call's first delta has index, id, type, function.name and arguments "";
    # later ones only index and an arguments fragment (no null id or name), hence plain dicts.
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
