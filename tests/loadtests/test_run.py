"""A short smoke run of the Locust scenario against the real local server with the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.run import main


def test_smoke_run_has_no_failures_and_sane_figures(server_url: str, tmp_path: Path) -> None:
    args = ["--url", server_url, "--scenario", "smoke", "--users", "3", "--duration", "20", "--max-tokens", "24"]
    args += ["--mix", "stream_chat=1,chat=1,embeddings=1", "--think", "0.2-0.5", "--stop-timeout", "5"]
    args += ["--out", str(tmp_path)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (step,) = summary["runs"]["fnserve"]
    assert step["users"] == 3 and step["requests"] >= 3
    assert step["failures"] == 0 and step["rejected"] == 0
    assert step["output_tokens_per_s"] > 1
    assert 0 < step["ttft_p50"] <= step["ttft_p95"] < 20
    assert 0 < step["itl_p50"] <= step["itl_p95"] < 5
    assert 0 < step["tpot_p50"] < 5 and 0 < step["e2e_p50"] <= step["e2e_p95"]
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert (tmp_path / "fnserve" / "report.html").is_file()
    assert (tmp_path / "fnserve" / "locust_stats.csv").is_file()


def test_failures_past_the_threshold_exit_non_zero(server_url: str, tmp_path: Path) -> None:
    args = ["--url", server_url, "--scenario", "smoke", "--users", "1", "--duration", "3", "--model", "no-such-model"]
    assert main([*args, "--out", str(tmp_path)]) == 1
