"""The load-test report's arithmetic on hand-made samples."""

from __future__ import annotations

import pytest

from loadtests import report

HEADER = {"event": "start", "time": 100.0, "steps": [{"users": 1, "seconds": 10}, {"users": 4, "seconds": 10}]}


def sample(step: int, start: float, first: float, end: float, tokens: int, **extra: object) -> dict:
    itl = [(end - first) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return {
        "kind": "stream_chat", "step": step, "start": start, "first": first, "end": end, "ok": True, "status": 200,
        "tokens": tokens, "ttft": first - start, "tpot": (end - first) / (tokens - 1), "itl": itl, **extra,
    }  # fmt: skip


def test_steps_get_their_own_latencies_and_throughput() -> None:
    samples = [
        sample(0, 101.0, 101.5, 105.5, 41),  # 40 gaps of 0.1 s, all inside step 0
        sample(1, 111.0, 112.0, 114.0, 21),
        {"kind": "chat", "step": 1, "start": 112.0, "end": 113.0, "ok": False, "status": 503, "tokens": 0},
        {"kind": "chat", "step": 1, "start": 112.0, "end": 113.0, "ok": False, "status": 500, "tokens": 0},
    ]
    first, second = report.summarise(HEADER, samples)
    assert (first["users"], first["requests"], first["completed"]) == (1, 1, 1)
    assert first["ttft_p50"] == pytest.approx(0.5)
    assert first["tpot_p50"] == pytest.approx(0.1)
    assert first["itl_p50"] == pytest.approx(0.1)
    assert first["e2e_p50"] == pytest.approx(4.5)
    assert first["output_tokens_per_s"] == pytest.approx(41 / 10)
    assert (second["failures"], second["rejected"]) == (1, 1)
    assert second["output_tokens_per_s"] == pytest.approx(21 / 10)


def test_a_request_spanning_two_steps_splits_its_tokens() -> None:
    samples = [sample(0, 105.0, 107.0, 111.0, 100)]  # 3/4 of its token time in step 0, 1/4 in step 1
    first, second = report.summarise(HEADER, samples)
    assert first["output_tokens_per_s"] == pytest.approx(75 / 10)
    assert second["output_tokens_per_s"] == pytest.approx(25 / 10)


def test_comparison_prints_ratios() -> None:
    ours = report.summarise(HEADER, [sample(0, 101.0, 101.2, 102.0, 41)])
    peer = report.summarise(HEADER, [sample(0, 101.0, 101.4, 103.0, 41)])
    text = report.comparison(ours, peer, ("fnserve", "peer"))
    assert "0.50" in text  # TTFT p95 ratio: 200 ms against 400 ms


def test_rounds_pool_their_samples_step_by_step() -> None:
    """Two runs of the same shape at different times: tokens over both runs' seconds, latencies pooled."""
    later = {**HEADER, "time": 500.0}
    rounds = [
        (HEADER, [sample(0, 101.0, 101.5, 105.5, 41), sample(1, 111.0, 112.0, 114.0, 21)]),
        (later, [sample(0, 501.0, 502.5, 506.5, 81), sample(1, 511.0, 511.5, 512.5, 11)]),
    ]
    first, second = report.summarise_rounds(rounds)
    assert (first["requests"], first["seconds"]) == (2, 20)
    assert first["output_tokens_per_s"] == pytest.approx((41 + 81) / 20)
    assert first["ttft_p50"] == pytest.approx(1.0)  # 0.5 s and 1.5 s
    assert second["output_tokens_per_s"] == pytest.approx((21 + 11) / 20)


def test_a_stream_cut_off_at_the_end_keeps_its_tokens_and_is_no_failure() -> None:
    """The run stops mid-stream: the 30 tokens that arrived in the last step count; the request is no failure."""
    cut = sample(1, 115.0, 116.0, 119.0, 30, ok=False, status=200, interrupted=True)
    first, second = report.summarise(HEADER, [sample(1, 111.0, 112.0, 114.0, 21), cut])
    assert second["output_tokens_per_s"] == pytest.approx((21 + 30) / 10)
    assert (second["requests"], second["failures"], second["interrupted"]) == (1, 0, 1)
    assert second["ttft_p50"] == pytest.approx(1.0)  # the cut stream's latencies are not pooled
