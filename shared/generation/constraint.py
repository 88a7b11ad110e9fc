"""Constrained decoding with llguidance: grammars compiled once per model and cached, a matcher per sequence.

A sequence that carries a Constraint has each step's logits masked to the tokens its grammar allows before it
samples, and the chosen token fed back; a grammar that can take no more tokens ends the sequence. logprobs are
still read from the model's own logits (Sequence.step masks a copy).

Compiling runs off the engine's thread and off the event loop (llguidance drops the GIL), bounded by the parser
limits below and a time limit, so a hostile schema costs one worker thread for at most that long.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from shared.errors import InvalidRequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# JSON as people write it (json.dumps' separators), on one line: whitespace never runs away.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Tighter than llguidance's defaults (grammar size 500k, lexer fuel 1M): the schemas of an API request.
LIMITS = LLParserLimits(max_grammar_size=50_000, initial_lexer_fuel=200_000, step_lexer_fuel=100_000)
CACHED = 256  # compiled grammars kept per model
_PENALTY = np.array([-np.inf, 0.0], dtype=np.float32)  # what a token's mask bit adds to its logit


def json_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar for JSON that validates against `schema`."""
    return str(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))  # type: ignore[arg-type]


def inline_json(schema: dict[str, Any]) -> str:
    """`schema` inlined in a Lark grammar (`%json {...}`), with the same JSON options as json_grammar."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class Grammars:
    """One model's grammar compiler: its tokenizer adapter (built on the first constrained request: ~0.35 s and
    ~40 MB that a server which never sees one does not pay at start) and a cache of compiled grammars by text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: tuple[int, ...]) -> None:
        self._source = tokenizer
        self._eos_ids = eos_ids
        self._tokenizer: LLTokenizer | None = None
        self._failure: BaseException | None = None
        self._cache: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._adapter_lock = threading.Lock()

    def tokenizer(self) -> LLTokenizer:
        """The tokenizer adapter, built by the first caller (others wait for it); blocks for ~0.35 s that once."""
        with self._adapter_lock:
            if self._tokenizer is None and self._failure is None:
                import llguidance.hf  # imports transformers, which a loaded model has imported already

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._source, eos_token=list(self._eos_ids))  # type: ignore[arg-type]
                except Exception as exc:  # a slow tokenizer llguidance cannot read: constraints are refused
                    self._failure = exc
        if self._tokenizer is None:
            raise InvalidRequestError(f"this model's tokenizer cannot be constrained: {self._failure}")
        return self._tokenizer

    async def compile(self, grammar: str, param: str, timeout: float) -> LLMatcher:
        """A compiled matcher for `grammar` (cached by its text; callers take copies); 400 naming `param` when the
        grammar is invalid, uses what llguidance does not implement, or takes longer than `timeout` seconds."""
        with self._lock:
            if (hit := self._cache.get(grammar)) is not None:
                self._cache.move_to_end(grammar)
                return hit
        try:
            matcher, error = await asyncio.wait_for(asyncio.to_thread(self._build, grammar), timeout)
        except TimeoutError:
            raise InvalidRequestError(
                f"the {param} grammar took longer than {timeout:g} s to compile; simplify the schema", param=param
            ) from None
        if error is not None:
            raise InvalidRequestError(f"{param} cannot be enforced: {error}", param=param)
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return matcher

    def _build(self, grammar: str) -> tuple[LLMatcher, str | None]:
        """The matcher, and why it cannot serve: an invalid grammar, or one that no text matches (a schema whose
        only definition refers to itself), which llguidance finds when it computes the first mask (~1 ms)."""
        matcher = LLMatcher(self.tokenizer(), grammar, log_level=0, limits=LIMITS)
        if matcher.is_error():
            return matcher, _first_line(matcher.get_error())
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            return matcher, f"no text matches it ({_first_line(probe.get_error())})"
        return matcher, None


class Constraint:
    """One sequence's grammar state: masks a step's logits, takes the sampled token."""

    def __init__(self, compiled: LLMatcher, vocab_size: int) -> None:
        self.matcher = compiled.deep_copy()
        self._bitmask = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)
        self._bits = self._bitmask.view(np.uint8)

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar does not allow next to -inf, in place."""
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        bits = np.unpackbits(self._bits[0], bitorder="little")[: len(logits)]  # 1 a token allowed, 0 not
        allowed = bits.view(bool)  # flatnonzero is 6x faster on bools than on uint8
        n = len(allowed)
        count = int(np.count_nonzero(allowed))
        # Masks are mostly sparse (JSON's structure) or nearly full (inside a string): then index the few
        # tokens (14-16 us for 49k); in between, a gather and an add (60 us; a boolean assignment took 170).
        if count < n // 8:
            keep = np.flatnonzero(allowed)
            kept = logits[keep]
            logits.fill(-np.inf)
            logits[keep] = kept
        elif n - count < n // 8:
            logits[np.flatnonzero(~allowed)] = -np.inf
        else:
            logits[:n] += _PENALTY[bits]
        logits[n:] = -np.inf  # ids past the tokenizer's vocabulary (an embedding padded for speed)
        if self.matcher.is_error():  # the request's grammar has a dead end: a schema no value matches, found late
            raise InvalidRequestError(
                "the requested schema cannot be enforced: no text matches it from here "
                f"({_first_line(self.matcher.get_error())}); a schema that only refers to itself is one such"
            )

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and takes no more tokens."""
        return bool(self.matcher.is_stopped())


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"
