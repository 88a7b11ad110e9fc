"""The in-process decode-step benchmark of the GPU check, run on the CPU over a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import bench_steps
from tests.shared.backends.test_llama_configs import tiny_model


def test_each_row_count_is_timed_as_it_comes_and_as_a_fixed_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_model(tmp_path / "model", max_position_embeddings=512)
    out = tmp_path / "steps.json"
    argv = [str(tmp_path / "model"), "--device", "cpu", "--dtype", "float32", "--rows", "1,3", "--steps", "3"]
    assert bench_steps.main([*argv, "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert [s["rows"] for s in steps] == [1, 3]
    assert all(s["eager_ms"] > 0 and s["graphs_ms"] > 0 for s in steps)
    printed = capsys.readouterr().out
    assert "eager runner: started in" in printed and "graphs runner: started in" in printed
    assert "decode steps on cpu (float32)" in printed


def test_a_checkpoint_the_runner_does_not_implement_is_refused(tmp_path: Path) -> None:
    tiny_model(tmp_path / "model", hidden_act="gelu")
    with pytest.raises(SystemExit, match="not a checkpoint the batched runner implements"):
        bench_steps.main([str(tmp_path / "model"), "--device", "cpu", "--steps", "1"])
