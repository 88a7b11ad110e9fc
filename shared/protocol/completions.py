"""Completions (legacy): https://platform.openai.com/docs/api-reference/completions/create"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from shared.errors import InvalidRequestError
from shared.generation.params import SamplingParams
from shared.protocol.chat import Number
from shared.protocol.common import OpenAIModel, StreamOptions, UsageInfo
from shared.protocol.sampling import build_sampling_params
from shared.settings import Settings

Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(OpenAIModel):
    model: StrictStr = "default"
    prompt: Prompt
    best_of: StrictInt | None = None
    echo: StrictBool | None = False
    frequency_penalty: Number | None = 0.0
    logit_bias: dict[str, Number] | None = None
    logprobs: StrictInt | None = None
    max_tokens: StrictInt | None = Field(default=16, description="OpenAI's default for completions is 16")
    n: StrictInt | None = 1
    presence_penalty: Number | None = 0.0
    # Not in OpenAI's completions API: chat's response_format, here too (text, json_object, json_schema).
    response_format: dict[str, Any] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    suffix: StrictStr | None = None
    temperature: Number | None = 1.0
    top_p: Number | None = 1.0
    user: StrictStr | None = None

    # --- fnserve extras (not in OpenAI's API) ---
    top_k: StrictInt | None = Field(default=None, description="sample from the k most likely tokens; 0 = off")
    min_p: Number | None = Field(default=None, description="drop tokens below min_p x the top probability")
    repetition_penalty: Number | None = Field(default=None, description="CTRL-style penalty over prompt+output")
    ignore_eos: StrictBool | None = Field(default=None, description="keep generating past end-of-sequence")
    min_tokens: StrictInt | None = Field(default=None, description="generate at least this many tokens")

    def prompts(self) -> list[str | list[int]]:
        """The batch: each entry a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, limits: Settings) -> SamplingParams:
        """The engine's parameters for this request, after every check of its values (400 naming the field)."""
        if self.suffix:
            raise InvalidRequestError("suffix (insertion) is not supported by this server", param="suffix")
        n = 1 if self.n is None else self.n
        if self.best_of not in (None, n):
            raise InvalidRequestError("best_of is not supported (only best_of == n)", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise InvalidRequestError("logprobs must be between 0 and 5", param="logprobs")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo together with logprobs is not supported", param="echo")
        logprobs = self.logprobs is not None
        return build_sampling_params(self, limits, self.max_tokens, logprobs=logprobs, top=self.logprobs or 0)


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
