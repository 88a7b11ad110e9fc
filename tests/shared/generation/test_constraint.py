"""Constrained decoding in the engine, on the real SmolLM2: each sequence follows its own grammar inside a batch,
logprobs stay the model's own, grammars are cached and bounded."""

from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import pytest

from shared.errors import InvalidRequestError
from shared.generation.constraint import json_grammar
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.protocol.structured import tool_plan
from shared.settings import Settings
from tests.conftest import run_steps
from tests.shared.generation.test_batching import PROMPTS

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 40}, "confidence": {"type": "integer", "maximum": 10}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def compile_grammar(model: GenerationModel, text: str, timeout: float = 5.0) -> object:
    return asyncio.run(model.grammars.compile(text, "response_format", timeout))


def test_a_batch_of_constrained_and_free_sequences_each_follow_their_own(smol: GenerationModel) -> None:
    """16 requests at once, every other one with a schema: the constrained ones validate, the free ones are
    the text they give alone."""
    grammar = compile_grammar(smol, json_grammar(SCHEMA))
    params = SamplingParams(temperature=0.0, max_tokens=60)
    prompts = [smol.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    grammars = [grammar if i % 2 else None for i in range(len(prompts))]

    async def one(prompt: list[int], g: object) -> str:
        stream = smol.engine.generate(smol.sequence(prompt, params, grammar=g))  # type: ignore[arg-type]
        return "".join([step.text async for step in stream])

    async def together() -> list[str]:
        return list(await asyncio.gather(*(one(p, g) for p, g in zip(prompts, grammars, strict=True))))

    texts = asyncio.run(together())
    for i, (text, prompt) in enumerate(zip(texts, prompts, strict=True)):
        if grammars[i] is not None:
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert text == "".join(s.text for s in run_steps(smol, prompt, params))
            assert not text.startswith("{")


def test_a_finished_grammar_ends_the_sequence_with_stop_at_once(smol: GenerationModel) -> None:
    grammar = compile_grammar(smol, json_grammar({"enum": ["yes", "no"]}))
    prompt = smol.encode_chat([{"role": "user", "content": "Is Paris in France?"}])
    seq = smol.sequence(prompt, SamplingParams(temperature=0.0, max_tokens=50), grammar=grammar)  # type: ignore[arg-type]

    async def run() -> list:
        return [s async for s in smol.engine.generate(seq)]

    steps = asyncio.run(run())
    assert "".join(s.text for s in steps) in ('"yes"', '"no"')
    assert steps[-1].finish_reason == "stop" and len(steps) < 6  # no token past the grammar's end, no EOS needed


def test_logprobs_are_the_models_own_distribution(smol: GenerationModel) -> None:
    """The grammar forces "{" first, but the reported alternatives are what the model itself preferred."""
    grammar = compile_grammar(smol, json_grammar({"type": "object"}))
    prompt = smol.encode_chat([{"role": "user", "content": "Name the capital city of France."}])
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=5)
    seq = smol.sequence(prompt, params, grammar=grammar)  # type: ignore[arg-type]

    async def run() -> list:
        return [s async for s in smol.engine.generate(seq)]

    first = asyncio.run(run())[0]
    free = run_steps(smol, prompt, params)[0]
    assert smol.decode([first.token_id or 0]).startswith("{")
    assert first.top_logprobs == free.top_logprobs  # the same five, with the same values
    assert first.token_id not in [t for t, _ in first.top_logprobs or []][:1]
    assert first.logprob is not None and first.logprob < first.top_logprobs[0][1]


def test_grammars_are_cached_by_their_text(smol: GenerationModel) -> None:
    text = json_grammar({**SCHEMA, "title": f"cached-{time.time()}"})
    started = time.perf_counter()
    first = compile_grammar(smol, text)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    assert compile_grammar(smol, text) is first
    assert time.perf_counter() - started < cold


def test_a_compile_past_the_time_limit_is_a_400(smol: GenerationModel) -> None:
    text = json_grammar({**SCHEMA, "title": f"slow-{time.time()}"})
    with pytest.raises(InvalidRequestError) as err:
        compile_grammar(smol, text, timeout=1e-6)
    assert err.value.param == "response_format" and "took longer" in err.value.message


def test_a_tool_call_grammar_accepts_calls_and_leaves_other_text_alone(smol: GenerationModel) -> None:
    """auto: text that does not start with the call marker is text (JSON in it included); after the marker
    only a valid call may follow."""
    from shared.generation.constraint import Constraint

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    plan = tool_plan(tools, "auto", None, Settings(preload=[]))
    assert plan is not None and (text := plan.grammar()) is not None
    from llguidance import LLMatcher

    grammar = compile_grammar(smol, LLMatcher.grammar_from_lark(text))
    vocab = smol.grammars.tokenizer().vocab_size

    def accepts(reply: str) -> bool:
        c = Constraint(grammar, vocab)  # type: ignore[arg-type]
        return bool(c.matcher.consume_tokens(smol.tokenizer.encode(reply, add_special_tokens=False)))

    assert accepts('Here is JSON: {"a": 1}')
    assert accepts('<tool_call>[{"name": "f", "arguments": {}}]</tool_call>')
    assert not accepts('<tool_call>[{"name": "g", "arguments": {}}]')
    assert not accepts("<tool_call>hello")
