"""Chat completions: https://platform.openai.com/docs/api-reference/chat/create"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from shared.errors import InvalidRequestError
from shared.generation.params import SamplingParams
from shared.protocol.common import OpenAIModel, StreamOptions, TokenLogprob, UsageInfo

Number = StrictInt | StrictFloat


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextContentPart] | None = None
    name: StrictStr | None = None

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
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = 1.0
    top_p: Number | None = 1.0
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    user: StrictStr | None = None

    # --- fnserve extras (not in OpenAI's API) ---
    top_k: StrictInt | None = Field(default=None, description="sample from the k most likely tokens; 0 = off")
    min_p: Number | None = Field(default=None, description="drop tokens below min_p x the top probability")
    repetition_penalty: Number | None = Field(default=None, description="CTRL-style penalty over prompt+output")
    ignore_eos: StrictBool | None = Field(default=None, description="keep generating past end-of-sequence")
    min_tokens: StrictInt | None = Field(default=None, description="generate at least this many tokens")

    @field_validator("messages")
    @classmethod
    def _last_message_sensible(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if all(m.role in ("system", "developer") for m in messages):
            raise ValueError("messages must include at least one user or assistant message")
        return messages

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them: plain text content; developer is OpenAI's newer system."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def to_sampling_params(self) -> SamplingParams:
        if self.tools:
            raise InvalidRequestError("tools / function calling is not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequestError("only response_format {'type': 'text'} is supported", param="response_format")
        n = 1 if self.n is None else self.n
        if not 1 <= n <= 16:
            raise InvalidRequestError("n must be between 1 and 16", param="n")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        return build_sampling_params(self, max_tokens, logprobs=bool(self.logprobs), top=self.top_logprobs or 0)


def build_sampling_params(request: Any, max_tokens: int | None, *, logprobs: bool, top: int) -> SamplingParams:
    """SamplingParams from the fields chat and completions share (None means the default)."""
    stop = request.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    try:
        bias = {int(k): float(v) for k, v in (request.logit_bias or {}).items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(pick(request.temperature, 1.0)),
        top_p=float(pick(request.top_p, 1.0)),
        top_k=int(pick(request.top_k, 0)),
        min_p=float(pick(request.min_p, 0.0)),
        repetition_penalty=float(pick(request.repetition_penalty, 1.0)),
        presence_penalty=float(pick(request.presence_penalty, 0.0)),
        frequency_penalty=float(pick(request.frequency_penalty, 0.0)),
        seed=request.seed,
        logit_bias=bias,
        stop=stops,
        ignore_eos=bool(request.ignore_eos),
        min_tokens=int(pick(request.min_tokens, 0)),
        logprobs=logprobs,
        top_logprobs=top,
    )


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


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


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
