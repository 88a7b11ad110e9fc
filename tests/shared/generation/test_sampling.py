from __future__ import annotations

import numpy as np
import pytest

from shared.generation.params import SamplingParams
from shared.generation.sampling import log_softmax, make_logits_processor, make_sampler, top_logprobs

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, 2.9], dtype=np.float32)


def test_temperature_zero_is_argmax() -> None:
    assert make_sampler(SamplingParams(temperature=0.0))(LOGITS) == 1


def test_same_seed_same_draws_and_different_seeds_differ() -> None:
    def draws(seed: int) -> list[int]:
        sample = make_sampler(SamplingParams(temperature=1.5, seed=seed))
        return [sample(LOGITS) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_one_is_greedy_and_top_k_limits_the_support() -> None:
    assert {make_sampler(SamplingParams(top_k=1, seed=s))(LOGITS) for s in range(20)} == {1}
    sample = make_sampler(SamplingParams(top_k=2, temperature=2.0, seed=0))
    assert {sample(LOGITS) for _ in range(200)} == {1, 4}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    sample = make_sampler(SamplingParams(top_p=0.5, temperature=1.0, seed=0))
    assert {sample(LOGITS) for _ in range(200)} <= {1, 4}
    sample = make_sampler(SamplingParams(top_p=0.01, seed=0))
    assert {sample(LOGITS) for _ in range(50)} == {1}


def test_min_p_drops_unlikely_tokens() -> None:
    # Relative to the top token: p(4) = 0.90, p(2) = 0.37, p(0) = 0.14, p(3) = 0.08.
    sample = make_sampler(SamplingParams(min_p=0.3, temperature=1.0, seed=0))
    assert {sample(LOGITS) for _ in range(300)} == {1, 2, 4}
    sample = make_sampler(SamplingParams(min_p=0.5, temperature=1.0, seed=0))
    assert {sample(LOGITS) for _ in range(300)} == {1, 4}


def test_logit_bias_can_force_and_forbid_tokens() -> None:
    process = make_logits_processor(SamplingParams(logit_bias={3: 100.0, 1: -100.0}), [], [])
    assert int(np.argmax(process(LOGITS, []))) == 3


def test_presence_and_frequency_penalties_follow_openai() -> None:
    process = make_logits_processor(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [], [])
    out = process(LOGITS, [1, 1, 2])
    assert out[1] == pytest.approx(3.0 - 0.5 - 2 * 0.25)
    assert out[2] == pytest.approx(2.0 - 0.5 - 0.25)
    assert out[4] == pytest.approx(2.9)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = make_logits_processor(SamplingParams(repetition_penalty=2.0), [0], [])(logits, [1])
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_eos_is_suppressed_until_min_tokens_and_always_with_ignore_eos() -> None:
    logits = np.array([0.0, 5.0, 1.0], dtype=np.float32)
    process = make_logits_processor(SamplingParams(min_tokens=2), [], eos_ids=[1])
    assert np.isneginf(process(logits, [2])[1])
    assert process(logits, [2, 2])[1] == 5.0
    ignore = make_logits_processor(SamplingParams(ignore_eos=True), [], eos_ids=[1])
    assert np.isneginf(ignore(logits, [2] * 100)[1])


def test_logprobs_are_normalised_and_top_logprobs_sorted() -> None:
    lp = log_softmax(LOGITS)
    assert np.exp(lp).sum() == pytest.approx(1.0)
    top = top_logprobs(lp, 3)
    assert [t for t, _ in top] == [1, 4, 2]
    assert top[0][1] >= top[1][1] >= top[2][1]
