"""What one generation asks for, independent of HTTP: the engine's view of a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import InvalidRequestError

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one sequence. temperature 0 means greedy."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be greater than 0 and at most 1"),
            (self.top_k >= 0, "top_k", "must be 0 (off) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be between 0 and 1"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2"),
            (
                all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias",
                "values in [-100, 100]",
            ),
            (len(self.stop) <= MAX_STOP_SEQUENCES, "stop", f"at most {MAX_STOP_SEQUENCES} sequences"),
            (all(self.stop), "stop", "stop sequences must not be empty"),
            (self.min_tokens >= 0, "min_tokens", "must not be negative"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be 0-{MAX_TOP_LOGPROBS}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(f"{param} {message}", param=param)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens must not exceed max_tokens", param="min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
