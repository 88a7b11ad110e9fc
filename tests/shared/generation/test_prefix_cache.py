from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.generation.prefix_cache import MIN_REUSE, PrefixCache
from tests.conftest import run_steps


def test_lookup_finds_the_longest_shared_prefix() -> None:
    cache = PrefixCache([7, 8])
    a = list(range(100))
    b = list(range(50)) + [999] * 50
    assert cache.store(a) == (8, 0) and cache.store(b) == (7, 0)
    assert cache.lookup(list(range(80)) + [5, 5]) == (8, 80)
    assert cache.lookup(list(range(50)) + [999, 1]) == (7, 51)
    assert cache.lookup([1, 2, 3]) is None
    assert cache.lookup(list(range(MIN_REUSE - 1)) + [-1]) is None  # too short to be worth it


def test_store_skips_covered_prompts_and_evicts_the_least_recently_used() -> None:
    cache = PrefixCache([1])
    first, second = list(range(40)), list(range(100, 140))
    assert cache.store(first) == (1, 0)
    assert cache.store(first[:30]) is None  # already covered by a stored prompt
    assert cache.store(second) == (1, 0)  # evicts `first`
    assert cache.lookup(first) is None and cache.lookup(second) == (1, 40)
    assert PrefixCache([]).store(first) is None


def test_a_repeated_system_prompt_is_not_prefilled_again(smol: GenerationModel) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    first = smol.encode_chat([system, {"role": "user", "content": "Name the capital city of France."}])
    second = smol.encode_chat([system, {"role": "user", "content": "What is 2+2?"}])
    params = SamplingParams(temperature=0.0, max_tokens=12)
    before = smol.engine.stats
    run_steps(smol, first, params)
    middle = smol.engine.stats
    reused = run_steps(smol, second, params)
    after = smol.engine.stats
    assert after.prefix_hits == middle.prefix_hits + 1
    shared_tokens = after.prefix_tokens - middle.prefix_tokens
    assert shared_tokens > 200  # the whole system prompt
    assert middle.prompt_tokens - before.prompt_tokens == len(first)
    assert after.prompt_tokens - middle.prompt_tokens == len(second) - shared_tokens  # less prefill work

    assert computed_afresh(smol, second, params) == "".join(s.text for s in reused)


def computed_afresh(smol: GenerationModel, prompt: list[int], params: SamplingParams) -> str:
    """The text of a run that computes every position itself (no cached prefixes)."""

    async def fresh() -> str:
        smol.engine.prefixes = type(smol.engine.prefixes)([])
        return "".join([s.text async for s in smol.generate(prompt, params)])

    saved = smol.engine.prefixes
    try:
        return asyncio.run(fresh())
    finally:
        smol.engine.prefixes = saved


def test_store_hands_an_extended_entry_its_slot() -> None:
    cache = PrefixCache([1, 2])
    turn = list(range(40))
    assert cache.store(turn) == (2, 0) and cache.store(list(range(100, 140))) == (1, 0)
    assert cache.store(turn + [7] * 30) == (2, 40)  # the next turn takes its earlier turn's slot, and its positions
    assert cache.lookup(list(range(100, 140))) == (1, 40)  # not the least recently used entry
    assert cache.lookup(turn + [7] * 30 + [1]) == (2, 70)


def test_a_conversations_next_turn_reuses_the_previous_reply(smol: GenerationModel) -> None:
    """A finished sequence's prompt and reply stay in the prefix cache, so the next turn, which sends the reply
    back inside its prompt, prefills only its new message, and answers as if it had computed every position."""
    question = {"role": "user", "content": "Write one sentence about the sea."}
    first = smol.encode_chat([question])
    params = SamplingParams(temperature=0.0, max_tokens=24)
    steps = run_steps(smol, first, params)
    reply = "".join(s.text for s in steps)
    written = first + [s.token_id for s in steps][:-1]  # the last token was sampled, never run
    second = smol.encode_chat([question, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}])
    common = next(i for i, (a, b) in enumerate(zip(second, written + [-1], strict=False)) if a != b)
    assert common >= len(first) + len(steps) - 1  # the reply comes back token for token

    middle = smol.engine.stats
    reused = run_steps(smol, second, params)
    after = smol.engine.stats
    assert after.prefix_tokens - middle.prefix_tokens >= common  # the previous prompt and the reply
    assert after.prompt_tokens - middle.prompt_tokens <= len(second) - common
    assert computed_afresh(smol, second, params) == "".join(s.text for s in reused)


def test_entries_stay_within_the_token_budget_and_give_back_what_leaves() -> None:
    released: list[int] = []
    cache = PrefixCache([1, 2, 3, 4], tokens=100, release=released.append)
    a, b, c = list(range(40)), list(range(100, 140)), list(range(200, 250))
    assert cache.store(a) == (4, 0) and cache.store(b) == (3, 0) and cache.tokens == 80
    assert cache.lookup(a) == (4, 40)  # `b` is now the least recently used
    assert cache.store(c) == (2, 0)  # 130 > 100: `b` leaves, its slot released
    assert released == [3] and cache.tokens == 90
    assert cache.lookup(b) is None and cache.lookup(a) == (4, 40) and cache.lookup(c) == (2, 50)
    assert cache.store(list(range(101))) is None  # longer than the whole budget: not kept
    assert cache.store(a + [7] * 20) == (4, 40)  # extends `a` in its own slot; `c` leaves to make room
    assert released == [3, 2] and cache.tokens == 60
    cache.forget(4)
    assert released == [3, 2, 4] and cache.tokens == 0


def test_a_released_slot_gives_its_memory_back_and_leaves_the_others_as_they_were(catalog) -> None:  # type: ignore[no-untyped-def]
    import torch

    from tests.shared.backends.test_llama import smol

    runner = smol(catalog, torch.float32, "int4", slots=3, max_len=1024)
    prompt = [(7 * i) % 5000 + 10 for i in range(1000)]
    for slot in range(3):
        runner.prefill(slot, prompt, 0)
    kept = runner.kv_cache[:, :, [0, 2]].copy()

    def resident_mb() -> float:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024

    before = resident_mb()
    runner.release_slot(1)
    after = resident_mb()
    written = runner.kv_cache[:, :, 1, :, :1000].size * 2 / 2**20  # 22 MB of keys and values (float16)
    assert before - after > 0.8 * written, (before, after, written)
    assert not runner.kv_cache[:, :, 1].any()  # reads as zeros
    assert np.array_equal(runner.kv_cache[:, :, [0, 2]], kept)
    assert np.array_equal(runner.prefill(1, prompt, 0), runner.prefill(0, prompt, 0))  # and works as before


def test_a_system_that_cannot_take_pages_back_keeps_them_and_serves_on(catalog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """madvise failing (a kernel or sandbox without MADV_REMOVE) must not end the engine's step: the slot keeps
    its memory until it is written again, and the entry's copy still lands."""
    import mmap

    import torch

    from tests.shared.backends.test_llama import smol

    runner = smol(catalog, torch.float32, "int4", slots=2, max_len=64)
    prompt = list(range(10, 40))
    runner.prefill(1, prompt, 0)

    class Refusing(mmap.mmap):
        def madvise(self, *args: int) -> None:
            raise OSError(22, "Invalid argument")

    refusing = Refusing(-1, len(runner._pages))
    refusing.write(runner._pages[:])
    monkeypatch.setattr(runner, "_pages", refusing)
    runner.release_slot(1)
    runner.release_slot(1)  # tried once, then left alone
    assert runner._keep_pages
    runner.move_slot(1, 0, len(prompt))
    assert np.array_equal(runner.prefill(0, [5], len(prompt)), runner.prefill(1, [5], len(prompt)))


def test_a_prompt_reuses_only_its_own_scopes_entries() -> None:
    cache = PrefixCache([1, 2, 3])
    prompt = list(range(40))
    assert cache.store(prompt, "alice") == (3, 0)
    assert cache.lookup(prompt, "bob") is None and cache.lookup(prompt) is None
    assert cache.store(prompt, "bob") == (2, 0)  # not covered by alice's entry: bob gets his own
    assert cache.lookup(prompt + [1], "bob") == (2, 40) and cache.lookup(prompt + [1], "alice") == (3, 40)
    assert cache.store(prompt + [5] * 10, "bob") == (2, 40)  # extends bob's entry, never alice's
