"""MLX batched (mlx-lm's batch cache behind the engine's BatchRunner) gives MLX unbatched's greedy tokens.

mlx[cpu] runs the same numerics on Linux as Metal's kernels do on a Mac, slowly: these runs stay short.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from shared.catalog import ModelCatalog
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.settings import Settings
from tests.shared.backends.test_conformance import PROMPTS, greedy, greedy_rows

pytestmark = [
    pytest.mark.mlx,
    pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm is not installed"),
]


def mlx_catalog(engine: Literal["batched", "simple"]) -> ModelCatalog:
    # A small chunk makes the engine prefill each prompt in pieces, with other sequences' rows as placeholders.
    return ModelCatalog(
        Settings(backend="mlx", engine=engine, preload=[], max_running=3, prefill_chunk=16, prefix_cache_slots=2)
    )


@pytest.fixture(scope="module")
def batched() -> Iterator[GenerationModel]:
    catalog = mlx_catalog("batched")
    yield catalog.generation("default")
    catalog.close()


@pytest.fixture(scope="module")
def simple() -> Iterator[GenerationModel]:
    catalog = mlx_catalog("simple")
    yield catalog.generation("default")
    catalog.close()


def test_the_batched_runner_serves_llama_family_models(batched: GenerationModel, simple: GenerationModel) -> None:
    from shared.backends.mlx_backend import MLXBatchRunner, MLXRunner

    assert isinstance(batched.runner, MLXBatchRunner)
    assert isinstance(simple.runner, MLXRunner)


def test_mlx_takes_an_installed_openblas_on_linux() -> None:
    """mlx[cpu]'s wheel links the reference BLAS; Debian's OpenBLAS, where installed (`.ci/run` installs it),
    is loaded first so that MLX's matmuls take it."""
    import ctypes.util

    import shared.backends.mlx_backend  # noqa: F401

    if sys.platform != "linux" or ctypes.util.find_library("openblas") is None:
        pytest.skip("no OpenBLAS installed (apt-get install libopenblas0-pthread)")
    assert "libopenblas" in Path("/proc/self/maps").read_text()


def test_rows_decoded_together_equal_each_alone(batched: GenerationModel, simple: GenerationModel) -> None:
    """Three prompts of different lengths as rows of one step (left-padded in mlx-lm's batch cache): the
    per-sequence runner's tokens, and the batch runner's own for each prompt alone."""
    from shared.backends.mlx_backend import MLXBatchRunner

    runner = batched.runner
    assert isinstance(runner, MLXBatchRunner)
    prompts = [batched.encode_chat(messages) for messages in PROMPTS]
    alone = [greedy(simple.runner, prompt, 10)[0] for prompt in prompts]
    assert [greedy(runner, prompt, 10)[0] for prompt in prompts] == alone
    assert greedy_rows(runner, prompts, 10) == alone


async def _generate(model: GenerationModel, prompts: list[list[int]], params: SamplingParams) -> list[str]:
    async def one(prompt: list[int]) -> str:
        return "".join([step.text async for step in model.generate(prompt, params)])

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def test_the_engine_batches_on_mlx_as_it_steps_each_alone(batched: GenerationModel, simple: GenerationModel) -> None:
    """Five requests through three running places: prompts prefilled in chunks beside decoding rows, sequences
    joining and leaving the batch, and a repeated prompt taken from the prefix cache, all give the tokens of
    the per-sequence engine."""
    contents = [
        "What is the capital of France?",
        "Write a haiku about autumn leaves falling on a quiet river at dusk.",
        "Name a colour.",
        "What is the capital of France?",
        "Explain in plain words how a bicycle stays upright while it is moving.",
    ]
    prompts = [batched.encode_chat([{"role": "user", "content": c}]) for c in contents]
    assert max(len(p) for p in prompts) > 2 * 16
    params = SamplingParams(temperature=0.0, max_tokens=10)
    want = asyncio.run(_generate(simple, prompts, params))
    assert asyncio.run(_generate(batched, prompts, params)) == want
    assert batched.engine.stats.prefix_hits >= 1
    assert want[0].startswith("The capital of France is Paris")


def test_gemma_3_runs_batched_and_other_rotating_caches_step_each_sequence(catalog: ModelCatalog) -> None:
    """Gemma 3's sliding layers mask their window themselves, so the batch runner takes it (in the batched engine's
    context); a model with rotating caches that is not known to mask its window steps each sequence."""
    from mlx_lm.utils import load_model

    from shared.backends import select_backend
    from shared.backends.mlx_backend import MLXBatchRunner, batchable

    path = gemma_dir(catalog)
    runner = select_backend(Settings(backend="mlx")).load(path)
    assert isinstance(runner, MLXBatchRunner)
    assert runner.context_length == 2048  # the batched engine's, as on torch (Gemma 3's own is 32768)
    assert select_backend(Settings(backend="mlx", max_model_len=4096)).load(path).context_length == 4096
    model, _ = load_model(path)
    assert batchable(model)
    model.model_type = "another_model"
    assert not batchable(model)


def test_gemma_3_batched_attends_within_its_sliding_window(catalog: ModelCatalog) -> None:
    """With the window cut to 10 positions, so that every prompt outgrows it: mlx-lm's per-sequence steps (its
    rotating caches of 10) give the batch runner's greedy tokens for each prompt alone, prefilled whole or in
    chunks of 7, and for the prompts decoded together as rows of one step."""
    from mlx_lm.utils import load_model

    from shared.backends.mlx_backend import MLXBatchRunner, MLXRunner
    from shared.generation.model import load_tokenizer

    path = gemma_dir(catalog)
    model, _ = load_model(path, model_config={"sliding_window": 10})
    tokenizer = load_tokenizer(path)
    prompts = [
        [int(i) for i in tokenizer(text)["input_ids"]]
        for text in (
            "The capital of France is Paris, and the capital of Italy is",
            "Once upon a time, in a small village by the sea, there lived an old fisherman who",
            "One, two, three, four, five, six, seven, eight, nine,",
        )
    ]
    assert min(len(p) for p in prompts) > 10
    want = [greedy(MLXRunner(model, 2048), prompt, 6)[0] for prompt in prompts]
    batch = MLXBatchRunner(model, 2048, slots=4)
    assert [greedy(batch, prompt, 6)[0] for prompt in prompts] == want
    assert greedy_rows(batch, prompts, 6) == want
    chunked = []
    for prompt in prompts:
        for start in range(0, len(prompt), 7):
            logits = batch.prefill(0, prompt[start : start + 7], start)
        chunked.append(int(np.argmax(logits)))
    assert chunked == [w[0] for w in want]
    # the cut window is what these runs attended through: the model's own 512 positions give other logits
    full = MLXRunner(load_model(path)[0], 2048)
    assert not np.allclose(full.forward(full.new_cache(), prompts[1]), batch.prefill(0, prompts[1], 0), atol=1e-3)


def gemma_dir(catalog: ModelCatalog) -> Path:
    from shared.sources import resolve_generation_model

    return resolve_generation_model(catalog.config("gemma-3-270m"), catalog.settings.cache_dir)
