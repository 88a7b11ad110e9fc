"""The generation core against the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from shared.errors import ContextLengthExceededError, InvalidRequestError
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from tests.conftest import CAPITAL, run_steps


def text_of(steps: list) -> str:
    return "".join(s.text for s in steps)


def test_greedy_answer_is_sensible_and_deterministic(smol: GenerationModel) -> None:
    ids = smol.encode_chat(CAPITAL)
    first = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=40))
    second = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=40))
    assert "Paris" in text_of(first)
    assert [s.token_id for s in first] == [s.token_id for s in second]
    assert first[-1].finish_reason == "stop"


def test_same_seed_same_text_different_seeds_differ(smol: GenerationModel) -> None:
    ids = smol.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])

    def sampled(seed: int) -> str:
        return text_of(run_steps(smol, ids, SamplingParams(temperature=1.0, seed=seed, max_tokens=24)))

    assert sampled(1) == sampled(1)
    assert len({sampled(1), sampled(2), sampled(3)}) > 1


def test_max_tokens_gives_length_and_exact_usage(smol: GenerationModel) -> None:
    ids = smol.encode_chat([{"role": "user", "content": "Count from one to fifty in words."}])
    steps = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=7))
    assert len(steps) == 7
    last = steps[-1]
    assert last.finish_reason == "length"
    assert last.completion_tokens == 7
    assert last.prompt_tokens == len(ids)
    expected: Any = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count from one to fifty in words."}], add_generation_prompt=True
    )
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert last.prompt_tokens == len(expected)
    assert text_of(steps) == smol.tokenizer.decode(
        [s.token_id for s in steps if s.token_id is not None], skip_special_tokens=True
    )


def test_eos_finishes_with_stop_and_counts_the_eos_token(smol: GenerationModel) -> None:
    steps = run_steps(smol, smol.encode_chat(CAPITAL), SamplingParams(temperature=0.0, max_tokens=100))
    assert steps[-1].finish_reason == "stop"
    assert steps[-1].token_id in smol.eos_ids
    assert steps[-1].completion_tokens == len(steps)
    assert steps[-1].text == ""  # the end-of-turn marker is never shown


def test_stop_string_is_not_emitted_even_when_split_across_tokens(smol: GenerationModel) -> None:
    ids = smol.encode_chat(CAPITAL)
    full = text_of(run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=40)))
    assert "capital city of France" in full
    stop = "ital city of Fr"  # starts and ends inside tokens
    steps = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,)))
    assert steps[-1].finish_reason == "stop"
    assert text_of(steps) == full[: full.index(stop)]


def test_stop_token_ids_end_generation(smol: GenerationModel) -> None:
    ids = smol.encode_chat(CAPITAL)
    greedy = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=40))
    third = greedy[2].token_id
    assert third is not None
    steps = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=(third,)))
    assert len(steps) == 3 and steps[-1].finish_reason == "stop"
    assert text_of(steps) == text_of(greedy[:2])


def test_streamed_deltas_concatenate_to_the_decoded_text_with_multibyte_characters(
    smol: GenerationModel,
) -> None:
    ids = smol.encode_chat([{"role": "user", "content": "Write three emoji and the word café in Japanese: 🍰"}])
    steps = run_steps(smol, ids, SamplingParams(temperature=0.9, seed=4, max_tokens=48, ignore_eos=True))
    text = text_of(steps)
    assert text == smol.tokenizer.decode(
        [s.token_id for s in steps if s.token_id is not None], skip_special_tokens=True
    )
    assert all("\ufffd" not in s.text for s in steps[:-1])
    assert any(ord(ch) > 0x7F for ch in text), "the prompt should draw out non-ASCII text"


def test_ignore_eos_and_min_tokens_keep_generating(smol: GenerationModel) -> None:
    ids = smol.encode_chat(CAPITAL)
    steps = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    assert len(steps) == 30 and steps[-1].finish_reason == "length"
    steps = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=30, min_tokens=20))
    assert len(steps) >= 20


def test_logit_bias_steers_the_first_token(smol: GenerationModel) -> None:
    ids = smol.encode_chat(CAPITAL)
    target = smol.tokenizer.encode("Banana", add_special_tokens=False)[0]
    steps = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=3, logit_bias={target: 100.0}))
    assert all(s.token_id == target for s in steps)


def test_logprobs_of_greedy_tokens_are_the_top_ones(smol: GenerationModel) -> None:
    ids = smol.encode_chat(CAPITAL)
    steps = run_steps(smol, ids, SamplingParams(temperature=0.0, max_tokens=5, logprobs=True, top_logprobs=3))
    for s in steps:
        assert s.top_logprobs is not None and len(s.top_logprobs) == 3
        assert s.top_logprobs[0][0] == s.token_id
        assert s.logprob == pytest.approx(s.top_logprobs[0][1])
        assert s.logprob is not None and s.logprob <= 0.0


def test_context_length_is_checked_for_the_prompt_and_for_max_tokens(smol: GenerationModel) -> None:
    n = smol.context_length
    with pytest.raises(ContextLengthExceededError):
        smol.sequence([1] * n, SamplingParams())
    with pytest.raises(ContextLengthExceededError) as err:
        smol.sequence([1] * 10, SamplingParams(max_tokens=n))
    assert err.value.param == "max_tokens"
    assert smol.sequence([1] * 10, SamplingParams()).max_tokens == n - 10
    with pytest.raises(InvalidRequestError):
        smol.sequence([], SamplingParams())


def test_closing_the_stream_cancels_the_generation(smol: GenerationModel) -> None:
    ids = smol.encode_chat([{"role": "user", "content": "Tell me a long story."}])

    async def take_three() -> None:
        stream = smol.generate(ids, SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()

    before = smol.engine.stats.cancelled
    asyncio.run(take_three())
    deadline = time.monotonic() + 5
    while smol.engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert smol.engine.stats.running == 0
    assert smol.engine.stats.cancelled == before + 1


def test_concurrent_requests_each_get_their_own_answer(smol: GenerationModel) -> None:
    prompts = [CAPITAL, [{"role": "user", "content": "What is 2+2?"}]]
    alone = [
        text_of(run_steps(smol, smol.encode_chat(p), SamplingParams(temperature=0.0, max_tokens=20))) for p in prompts
    ]

    async def together() -> list[str]:
        async def one(p: list) -> str:
            steps = [
                s async for s in smol.generate(smol.encode_chat(p), SamplingParams(temperature=0.0, max_tokens=20))
            ]
            return text_of(steps)

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    assert asyncio.run(together()) == alone


def test_chat_without_a_template_is_a_clear_error(catalog) -> None:  # type: ignore[no-untyped-def]
    gemma = catalog.generation("gemma-3-270m")
    with pytest.raises(InvalidRequestError) as err:
        gemma.encode_chat(CAPITAL)
    assert "no chat template" in err.value.message
    steps = run_steps(gemma, gemma.encode("The capital of France is"), SamplingParams(temperature=0.0, max_tokens=12))
    assert "France" in text_of(steps) or "Paris" in text_of(steps)


def test_the_generic_tokenizer_loads_without_transformers_model_registry(catalog) -> None:  # type: ignore[no-untyped-def]
    """The embedded models name transformers' generic tokenizer; loading it as itself skips transformers' registry
    of every model (~0.4 s of a function's cold start) and tokenizes exactly as that registry's class does."""
    from transformers import AutoTokenizer

    from tests.shared.backends.test_conformance import model_dir

    path = model_dir(catalog)
    messages = [{"role": "user", "content": "What is 17 times 23?"}]
    code = (
        "import json, pathlib, sys; from shared.generation.model import load_tokenizer; "
        f"t = load_tokenizer(pathlib.Path({str(path)!r})); "
        f"chat = t.apply_chat_template({messages!r}, add_generation_prompt=True, tokenize=False); "
        "print(json.dumps([chat, t(chat, add_special_tokens=False)['input_ids'], t('12 cafés  déjà-vu')['input_ids'], "
        "'transformers.models' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    chat, chat_ids, plain_ids, registry_imported = json.loads(out.splitlines()[-1])
    assert not registry_imported
    reference = AutoTokenizer.from_pretrained(path)
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == expected and "17 times 23" in chat
    assert chat_ids == reference(expected, add_special_tokens=False)["input_ids"]
    assert plain_ids == reference("12 cafés  déjà-vu")["input_ids"]
