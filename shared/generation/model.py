"""A loaded generation model: runner, tokenizer and engine, and the prompt-side checks every function shares."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from shared.backends import BatchRunner, ModelRunner
from shared.errors import ContextLengthExceededError, InvalidRequestError
from shared.generation.constraint import Constraint, Grammars
from shared.generation.engine import Engine, Stream
from shared.generation.params import SamplingParams
from shared.generation.sequence import Sequence
from shared.sources import GENERIC_TOKENIZERS

if TYPE_CHECKING:
    from llguidance import LLMatcher

Message = dict[str, Any]


class GenerationModel:
    def __init__(
        self,
        model_id: str,
        model_dir: Path,
        load: Callable[[], ModelRunner | BatchRunner],
        *,
        max_model_len: int | None,
        max_prompt_tokens: int | None,
        max_completion_tokens: int | None,
        max_running: int,
        max_queue: int,
        prefill_chunk: int,
        prefix_tokens: int | None = None,
        compute_thread: bool = True,
    ) -> None:
        self.id = model_id
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_ids = _eos_ids(model_dir, self.tokenizer)
        # Constrained decoding's tokenizer adapter is built on the first request that needs it.
        self.grammars = Grammars(self.tokenizer, self.eos_ids)
        # The engine loads the weights on the compute thread (see Engine) and serves from its own thread.
        self.engine = Engine(
            load,
            max_running=max_running,
            max_queue=max_queue,
            prefill_chunk=prefill_chunk,
            prefix_tokens=prefix_tokens,
            name=model_id,
            compute_thread=compute_thread,
        )
        self.runner = self.engine.runner
        self.context_length = min(self.runner.context_length, max_model_len or self.runner.context_length)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_completion_tokens = max_completion_tokens

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    @property
    def template_renders_tools(self) -> bool:
        """Whether the chat template lays out a `tools` list itself (else the prompt format of docs/tools)."""
        return "tools" in str(self.tokenizer.chat_template or "")

    def encode_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation through the model's own chat template, ready for the reply."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                f"model {self.id!r} has no chat template, so it serves /v1/completions only; "
                "send a plain prompt there, or choose a chat model",
                param="model",
                code="chat_template_missing",
            )
        try:
            ids: Any = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,  # type: ignore[arg-type]  # transformers types the list's items narrowly
                add_generation_prompt=True,
                tokenize=True,
            )
        except Exception as exc:  # templates raise on conversations they do not support (jinja errors)
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt, with the special tokens (BOS) the model expects."""
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def sequence(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        param: str = "messages",
        grammar: LLMatcher | None = None,
        scope: str | None = None,
    ) -> Sequence:
        """A sequence ready for the engine, after the context-length checks; `grammar` (compiled by self.grammars)
        constrains its output; `scope` is whose cached prefixes it shares (see PrefixCache)."""
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param=param)
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; the limit is {self.max_prompt_tokens} (max_prompt_tokens)", param=param
            )
        if n >= self.context_length:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens. However, your prompt has "
                f"{n} tokens. Please reduce the length of the prompt.",
                param=param,
            )
        max_tokens = params.max_tokens
        if max_tokens is None:  # the rest of the context, within the server's cap
            max_tokens = min(self.context_length - n, self.max_completion_tokens or self.context_length)
        if n + max_tokens > self.context_length:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). Please reduce the "
                "prompt or max_tokens.",
                param="max_tokens",
            )
        constraint = Constraint(grammar, self.grammars.tokenizer().vocab_size) if grammar is not None else None
        return Sequence(
            prompt_ids, params, max_tokens, self.tokenizer, self.eos_ids, constraint=constraint, scope=scope
        )

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Stream:
        """Queue a generation now (OverloadedError at once when the queue is full); its steps to come."""
        return self.engine.generate(self.sequence(prompt_ids, params))

    def close(self) -> None:
        self.engine.close()


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer, its chat template included.

    When tokenizer_config.json names the tokenizer's class, that class loads it directly: AutoTokenizer would
    first build the model's own config class, which imports transformers' modeling code (1.5 s of a 3 s cold
    start here) only to learn the class the file already names. transformers' generic class (what the models
    converted from a GGUF name) is imported as itself: finding a class by its name imports transformers' registry
    of every model, ~0.4 s of a function's cold start.
    """
    config = model_dir / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if name in GENERIC_TOKENIZERS:
        generic: PreTrainedTokenizerBase = PreTrainedTokenizerFast.from_pretrained(model_dir)
        return generic
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    cls = tokenizer_class_from_name(name) if isinstance(name, str) else None
    tokenizer: PreTrainedTokenizerBase = (cls or AutoTokenizer).from_pretrained(model_dir)
    return tokenizer


def _eos_ids(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return tuple(sorted(ids))
