"""Decode steps of fixed shapes (what CUDA graphs replay) against the steps as they come, on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.backends import device_steps
from shared.backends.device_steps import DecodeGraphs
from shared.backends.llama import LlamaRunner
from shared.backends.llama_config import LlamaConfig
from tests.shared.backends.test_llama_configs import CUDA, GEMMA, TOKENS, reference, tiny_model

PROMPTS = [TOKENS[:5], TOKENS, TOKENS[2:9], [4, 8, 15, 16, 23]]  # slots 0..3; 3 is not in the decode steps


def runners(path: Path, device: str) -> tuple[LlamaRunner, LlamaRunner]:
    config = LlamaConfig.from_dir(path)
    assert config is not None
    eager, graphs = (
        LlamaRunner(
            path, config, dtype=torch.float32, quantization="none", slots=4, max_len=64, device=device, graphs=graphs
        )
        for graphs in (False, True)
    )
    for runner in (eager, graphs):
        for slot, prompt in enumerate(PROMPTS):
            runner.prefill(slot, prompt, 0)
    return eager, graphs


@pytest.mark.parametrize(
    ("model_type", "overrides"), [("llama", {}), ("gemma3_text", GEMMA)], ids=["llama", "gemma3-sliding"]
)
@pytest.mark.parametrize(("min_length", "lengths"), [(256, [64]), (4, [4, 8, 16, 32, 64])], ids=["whole", "lengths"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_fixed_shape_decode_steps_give_the_steps_own_logits_and_leave_other_slots_alone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_type: str,
    overrides: dict[str, Any],
    min_length: int,
    lengths: list[int],
    device: str,
) -> None:
    """Three rows run as a step of four (the fourth row writes to the scratch slot); then one row alone. Over the
    whole cache of 64 positions, or the first 4, 8 or 16 as the rows' positions grow. On the CPU the fixed-shape
    step runs uncaptured; on CUDA it is captured and replayed."""
    monkeypatch.setattr(device_steps, "MIN_LENGTH", min_length)
    model = tiny_model(tmp_path, model_type, **overrides)
    eager, graphs = runners(tmp_path, device)
    assert graphs.graphs is not None and graphs.graphs.sizes == [1, 2, 4] and graphs.graphs.lengths == lengths
    parked = graphs.kv_cache[:, :, 3].clone()  # a sequence the step does not run (the prefix cache keeps such)

    tokens, positions = [7, 9, 11], [len(p) for p in PROMPTS[:3]]
    for _ in range(3):  # the second time on, a captured graph replays with new rows
        want, got = (r.decode(tokens, positions) for r in (eager, graphs))
        assert got.shape == want.shape == (3, model.config.vocab_size)
        assert np.allclose(got, want, atol=1e-5)
        tokens, positions = [int(t) for t in np.argmax(want, axis=1)], [p + 1 for p in positions]
    assert torch.equal(graphs.kv_cache[:, :, 3], parked)

    one = graphs.decode([5], [positions[0]])  # slot 0 alone, at position 8: a step of one row over 16 positions
    assert np.allclose(one, eager.decode([5], [positions[0]]), atol=1e-5)
    graphs.move_slot(1, 0, len(TOKENS) - 1)  # TOKENS but its last token, as transformers reads it
    assert np.allclose(graphs.decode([TOKENS[-1]], [len(TOKENS) - 1])[0], reference(model), atol=1e-4)


def test_batch_sizes_are_powers_of_two_up_to_the_slots() -> None:
    def sizes(slots: int) -> list[int]:
        return DecodeGraphs(lambda step, b: step.token_ids, torch.device("cpu"), slots, 8, {}, {0}).sizes

    assert sizes(1) == [1]
    assert sizes(16) == [1, 2, 4, 8, 16]
    assert sizes(20) == [1, 2, 4, 8, 16, 20]
