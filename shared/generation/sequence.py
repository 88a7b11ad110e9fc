"""One generating sequence's state: from a step's logits to a StepOutput, with stops and counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shared.generation.constraint import Constraint
from shared.generation.detokenizer import Decoder, IncrementalDetokenizer, StopMatcher
from shared.generation.params import SamplingParams
from shared.generation.sampling import log_softmax, make_logits_processor, make_sampler, top_logprobs

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class StepOutput:
    """What one decode step produced for one sequence."""

    text: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    """A request inside the engine. Built on the caller's side, then stepped by the engine's thread."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    tokenizer: Decoder
    eos_ids: tuple[int, ...]
    output_ids: list[int] = field(default_factory=list)
    # Set by the reader's side (any thread), read by the engine's: a plain flag, no lock to take.
    cancelled: bool = False
    finished: bool = False
    admitted_at: float | None = None  # perf_counter() when the engine took it into the running batch
    constraint: Constraint | None = None  # a grammar the output must follow (structured outputs, tool calls)
    scope: str | None = None  # whose cached prefixes it may reuse and leave (an API key's name; None: no keys)

    def __post_init__(self) -> None:
        self._process = make_logits_processor(self.params, self.prompt_ids, self.eos_ids)
        self._sample = make_sampler(self.params)
        self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids)
        self._stops = StopMatcher(self.params.stop)
        self._stop_ids = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(self.eos_ids))

    def step(self, logits: np.ndarray) -> StepOutput:
        """Sample the next token from this step's logits and say what it adds to the text."""
        processed = self._process(logits, self.output_ids)  # a copy: logprobs read the model's own logits
        if self.constraint is not None:
            self.constraint.mask(processed)
        token = self._sample(processed)
        self.output_ids.append(token)
        if self.constraint is not None and token not in self._stop_ids:
            self.constraint.advance(token)
        logprob, top = None, None
        if self.params.logprobs:
            lp = log_softmax(logits)  # the model's own distribution, as OpenAI reports it
            logprob = float(lp[token])
            top = top_logprobs(lp, self.params.top_logprobs)

        finish: FinishReason | None = None
        if token in self._stop_ids and len(self.output_ids) > self.params.min_tokens:
            text, _ = self._drain()  # the stop token's own text is never emitted
            finish = "stop"
        else:
            text, hit = self._stops.feed(self._detok.add(token))
            if hit:
                finish = "stop"
            elif self.constraint is not None and self.constraint.finished:  # the grammar takes no more tokens
                tail, _ = self._drain()
                text += tail
                finish = "stop"
            elif len(self.output_ids) >= self.max_tokens:
                tail, hit = self._drain()
                text += tail
                finish = "stop" if hit else "length"
        self.finished = finish is not None
        return StepOutput(
            text=text,
            token_id=token,
            logprob=logprob,
            top_logprobs=top,
            finish_reason=finish,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
        )

    def _drain(self) -> tuple[str, bool]:
        """Everything still held back, at the end of the sequence."""
        text, hit = self._stops.feed(self._detok.flush())
        return (text, True) if hit else (text + self._stops.flush(), False)
