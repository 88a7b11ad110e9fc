from __future__ import annotations

import pytest

from shared.generation.detokenizer import IncrementalDetokenizer, StopMatcher
from shared.generation.model import GenerationModel

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Crème brûlée, naïve café — ünïcödé.",
    "日本語のテキストと中文文本。",
    "Emoji: 🦜🎉👩‍👩‍👧 and math ∑∫√ done.",
    "  leading spaces\n\ttabs and\nnewlines  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode_and_never_split_a_character(smol: GenerationModel, text: str) -> None:
    tok = smol.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_spread_over_tokens_waits_for_its_last_byte(smol: GenerationModel) -> None:
    tok = smol.tokenizer
    ids = tok("🦜", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE splits this emoji, which is the point of the test
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🦜"


def test_stop_matcher_catches_a_stop_string_split_across_deltas() -> None:
    stops = StopMatcher(("STOP",))
    assert stops.feed("abc S") == ("abc ", False)
    assert stops.feed("TO") == ("", False)
    assert stops.feed("P and more") == ("", True)


def test_stop_matcher_releases_a_partial_match_that_did_not_complete() -> None:
    stops = StopMatcher(("\n\n", "END"))
    assert stops.feed("line\n") == ("line", False)
    assert stops.feed("next EN") == ("\nnext ", False)
    assert stops.feed("Dless") == ("", True)
    assert StopMatcher(("END",)).feed("EN") == ("", False)


def test_stop_matcher_picks_the_earliest_of_several_stops() -> None:
    emit, hit = StopMatcher(("world", "lo")).feed("hello world")
    assert (emit, hit) == ("hel", True)
