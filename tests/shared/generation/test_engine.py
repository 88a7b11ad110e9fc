"""Model compute runs off the event loop (each model's engine on its own thread, every forward pass on the one
compute thread): the server stays responsive while it works, and a failure ends the requests it hit with an
error, never a silent hang, while the engine goes on serving."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import torch

from shared.backends import BatchRunner, llama
from shared.backends.llama_config import LlamaConfig
from shared.catalog import ModelCatalog
from shared.errors import FnserveError, OverloadedError
from shared.generation.engine import Engine
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.generation.sequence import Sequence
from shared.serving.jobs import collect_jobs, expand, submit
from tests.shared.backends.test_conformance import model_dir

LONG = {
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
    "max_tokens": 1500,
    "ignore_eos": True,
    "temperature": 0,
    "stream": True,
}


def content_frames(lines: Iterator[str]) -> Iterator[str]:
    """The stream's data frames; fails on an error frame or the end, since the generation must still run."""
    for line in lines:
        if line.startswith("data: "):
            assert line != "data: [DONE]" and "error" not in json.loads(line[6:]), line
            yield line
    raise AssertionError("the stream ended early")


def test_health_answers_promptly_while_a_long_prompt_is_prefilled(server_url: str) -> None:
    """A ~1500-token prompt takes seconds of prefill in 256-token chunks (~1 s each in float32 here), and
    /health never waits for a chunk: the model runs on the engine's thread, not the event loop."""
    prompt = f"{uuid.uuid4()} " + " ".join(f"item{i}" for i in range(400))  # unique: no prefix-cache hit
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    result: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: result.append(httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=300))
    )
    start = time.perf_counter()
    request.start()
    latencies = []
    while request.is_alive():
        probe = time.perf_counter()
        health = httpx.get(f"{server_url}/health", timeout=5)
        latencies.append(time.perf_counter() - probe)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        time.sleep(0.05)
    request.join()
    took = time.perf_counter() - start
    assert result and result[0].status_code == 200, result[0].text if result else "no response"
    assert result[0].json()["usage"]["prompt_tokens"] > 1000
    assert took > 1.0 and len(latencies) > 10, f"the prefill took {took:.2f} s: too short to probe during"
    assert max(latencies) < 0.5, f"/health took up to {max(latencies):.3f} s during a {took:.1f} s prefill"


def test_a_second_model_answers_while_the_first_is_busy(server_url: str) -> None:
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server_url}/v1/chat/completions", json=LONG) as response:
            assert response.status_code == 200
            frames = content_frames(response.iter_lines())
            for _ in range(3):
                next(frames)
            other = httpx.post(
                f"{server_url}/v1/completions",
                json={"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
                timeout=300,
            )
            assert other.status_code == 200, other.text
            assert (
                other.json()["usage"]["completion_tokens"] == 8 or other.json()["choices"][0]["finish_reason"] == "stop"
            )
            next(frames)  # the first model's 1500 tokens are still streaming: Gemma did not wait for them


class Hooked:
    """The real batched runner, calling `before(name)` ahead of each call of one of its methods."""

    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner

    def before(self, name: str) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.runner, name)
        if not callable(method):
            return method

        def hooked(*args: Any) -> Any:
            self.before(name)
            return method(*args)

        return hooked


class Faulty(Hooked):
    """The real batched runner, with a fault injected on demand into one of its methods."""

    def __init__(self, runner: BatchRunner) -> None:
        super().__init__(runner)
        self.broken: str | None = None

    def before(self, name: str) -> None:
        if name == self.broken:
            raise RuntimeError(f"injected fault in {name}")


@pytest.fixture
def faulty(catalog: ModelCatalog) -> Iterator[tuple[Engine, Faulty]]:
    """A fresh engine (empty prefix cache) on its own runner, in the default's configuration as the session's
    engine runs it (its greedy text is the reference): 4 running slots and 2 for prefixes."""
    path = model_dir(catalog)
    config = LlamaConfig.from_dir(path)
    assert config is not None
    runner = Faulty(llama.runner(path, config, dtype=torch.bfloat16, quantization="auto", slots=6, max_len=256))
    engine = Engine(lambda: cast(BatchRunner, runner), max_running=4, name="faulty")
    yield engine, runner
    engine.close()


PROMPTS = ["Name a colour.", "Name the capital city of France.", "Who wrote Hamlet?"]


def _run(engine: Engine, smol: GenerationModel, prompts: list[str]) -> list[str | FnserveError]:
    """Each prompt's greedy text, or the error its stream ended with; a hang fails the test."""

    async def one(prompt: str) -> str | FnserveError:
        prompt_ids = smol.encode_chat([{"role": "user", "content": prompt}])
        seq = smol.sequence(prompt_ids, SamplingParams(max_tokens=12, temperature=0))
        try:
            return "".join([out.text async for out in engine.generate(seq)])
        except FnserveError as exc:
            return exc

    async def all_of() -> list[str | FnserveError]:
        return list(await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), timeout=60))

    return asyncio.run(all_of())


class StepThreads(Hooked):
    """The real batched runner, noting the thread each of its forward passes runs on."""

    def __init__(self, runner: BatchRunner) -> None:
        super().__init__(runner)
        self.threads: set[int | None] = set()

    def before(self, name: str) -> None:
        if name == "step":
            self.threads.add(threading.get_ident())


def test_every_models_load_and_forward_passes_run_on_one_thread(catalog: ModelCatalog, smol: GenerationModel) -> None:
    """OpenMP keeps its worker pools warm only while one thread drives them (a second engine thread driving
    its own made every step of the first 2.5x slower here): two engines load and step their models on the
    process's one compute thread, which is neither engine's own, and answer as one engine does."""
    path = model_dir(catalog)
    config = LlamaConfig.from_dir(path)
    assert config is not None
    loads: list[int | None] = []
    runners: list[StepThreads] = []

    def load() -> BatchRunner:
        loads.append(threading.get_ident())
        runners.append(
            StepThreads(llama.runner(path, config, dtype=torch.bfloat16, quantization="auto", slots=2, max_len=128))
        )
        return cast(BatchRunner, runners[-1])

    engines = [Engine(load, max_running=2, name=f"engine-{i}") for i in range(2)]
    try:
        answers = [_run(engine, smol, PROMPTS[:2]) for engine in engines]
        assert answers[0] == answers[1] and all(isinstance(a, str) and a for a in answers[0]), answers
        threads = set(loads).union(*(r.threads for r in runners))
        assert len(threads) == 1, "every load and step on one thread"
        assert threads.isdisjoint({engine._thread.ident for engine in engines})
    finally:
        for engine in engines:
            engine.close()


@pytest.mark.parametrize("fault", ["step", "move_slot"])
def test_a_fault_ends_its_requests_with_an_error_and_the_engine_serves_on(
    faulty: tuple[Engine, Faulty], smol: GenerationModel, fault: str
) -> None:
    """A failed forward pass, or a failed copy between slots (the engine's own bookkeeping, run between
    steps: a finished sequence's hole, the prefix cache), ends the requests it hit with an API error. It
    used to end the engine's thread on a failed copy, leaving every waiting request hanging; and a failed
    copy into the prefix cache left an entry that later prompts would have reused."""
    engine, runner = faulty
    want = _run(smol.engine, smol, PROMPTS)  # the session's own engine, same weights and precision
    assert all(isinstance(text, str) and text for text in want)

    runner.broken = fault
    failed = _run(engine, smol, PROMPTS)
    assert all(isinstance(e, FnserveError) and f"injected fault in {fault}" in str(e) for e in failed), failed
    assert engine.stats.running == 0

    runner.broken = None
    assert _run(engine, smol, PROMPTS) == want  # nothing of the failure stayed behind
    assert _run(engine, smol, PROMPTS) == want  # and now with the prefix cache's copies
    assert engine.stats.prefix_hits > 0


def test_closing_the_engine_ends_running_and_queued_requests_with_a_503(
    faulty: tuple[Engine, Faulty], smol: GenerationModel
) -> None:
    """Shutting down mid-generation: 4 running and 2 queued requests all end at once with "shutting down",
    none waits forever; a request after that is refused at once."""
    engine, _ = faulty
    prompt_ids = smol.encode_chat([{"role": "user", "content": "Tell me a long story."}])
    params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)

    async def one() -> int | OverloadedError:
        received = 0
        try:
            async for _ in engine.generate(smol.sequence(prompt_ids, params)):
                received += 1
        except OverloadedError as exc:
            return exc
        return received

    async def main() -> list[int | OverloadedError]:
        tasks = [asyncio.create_task(one()) for _ in range(6)]
        for _ in range(3000):
            if engine.stats.running == 4 and engine.stats.queued == 2:
                break
            await asyncio.sleep(0.01)
        assert (engine.stats.running, engine.stats.queued) == (4, 2)
        await asyncio.to_thread(engine.close)
        return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=30))

    results = asyncio.run(main())
    assert all(isinstance(r, OverloadedError) and "shutting down" in str(r) for r in results), results
    assert isinstance(_run(engine, smol, PROMPTS[:1])[0], OverloadedError)


def test_failures_are_counted_as_failed_never_as_completed(
    faulty: tuple[Engine, Faulty], smol: GenerationModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed forward pass used to be counted nowhere, and a failure in sampling or detokenizing counted
    as completed."""
    engine, runner = faulty
    before = engine.stats
    runner.broken = "step"
    _run(engine, smol, PROMPTS)
    runner.broken = None
    mid = engine.stats
    assert (mid.failed - before.failed, mid.completed - before.completed) == (len(PROMPTS), 0)

    def broken_sampling(self: Sequence, logits: Any) -> Any:
        raise RuntimeError("injected fault in sampling")

    monkeypatch.setattr(Sequence, "step", broken_sampling)
    _run(engine, smol, PROMPTS)
    after = engine.stats
    assert (after.failed - mid.failed, after.completed - mid.completed) == (len(PROMPTS), 0)


class RecordingEvent(threading.Event):
    """The engine's wake event, recording which threads set it."""

    def __init__(self) -> None:
        super().__init__()
        self.setters: list[str] = []

    def set(self) -> None:
        self.setters.append(threading.current_thread().name)
        super().set()


def test_a_stream_dropped_unread_is_cancelled_without_touching_the_engines_lock(
    faulty: tuple[Engine, Faulty], smol: GenerationModel
) -> None:
    """A Stream collected on another thread (the engine's, say) must not take the wake event's lock there,
    which could deadlock; it raises the sequence's flag and the engine frees its slot at the next step."""
    engine, _ = faulty
    wake = RecordingEvent()
    engine._wake = wake
    prompt_ids = smol.encode_chat([{"role": "user", "content": "Tell me a long story."}])
    seq = smol.sequence(prompt_ids, SamplingParams(max_tokens=200, ignore_eos=True, temperature=0))

    async def drop() -> None:
        stream = engine.generate(seq)
        await stream.__anext__()
        wake.setters.clear()
        holder = [stream]
        del stream
        collector = threading.Thread(target=holder.clear, name="collector")  # the last reference dies there
        collector.start()
        collector.join()

    asyncio.run(drop())
    assert seq.cancelled and "collector" not in wake.setters
    for _ in range(500):
        if engine.stats.running == 0:
            break
        time.sleep(0.01)
    assert engine.stats.running == 0 and len(seq.output_ids) < 200


async def test_a_cancelled_handler_cancels_its_generation(smol: GenerationModel) -> None:
    """collect_jobs used to leave its inner task running when the handler itself was cancelled (a server
    shutting down, a Lambda timeout), so the generation ran on to max_tokens."""
    prompt_ids = smol.encode_chat([{"role": "user", "content": "Tell me a long story."}])
    params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
    streams = submit(smol, expand(smol, [prompt_ids], params, 2))
    handler = asyncio.create_task(collect_jobs(smol, streams))
    while not all(s.seq.output_ids for s in streams):
        await asyncio.sleep(0.01)
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert all(s.seq.cancelled for s in streams)
    for _ in range(500):
        if smol.engine.stats.running == 0:
            break
        await asyncio.sleep(0.01)
    assert smol.engine.stats.running == 0
    assert all(len(s.seq.output_ids) < 400 for s in streams)


async def test_cancelling_the_only_running_sequence_counts_a_cancel_and_no_failure(
    smol: GenerationModel, caplog: pytest.LogCaptureFixture
) -> None:
    """With its last sequence cancelled, a step used to run with no rows at all, fail in the runner (an empty
    index), and log a generation error."""
    while smol.engine.stats.running:
        await asyncio.sleep(0.01)
    before = smol.engine.stats
    prompt_ids = smol.encode_chat([{"role": "user", "content": "Tell me a long story."}])
    stream = smol.generate(prompt_ids, SamplingParams(max_tokens=400, ignore_eos=True, temperature=0))
    await stream.__anext__()
    await stream.aclose()
    for _ in range(500):
        if smol.engine.stats.running == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # a step after the removal, where the failure was
    after = smol.engine.stats
    assert after.cancelled == before.cancelled + 1 and after.failed == before.failed
    assert not [r for r in caplog.records if r.name == "shared.generation.engine" and r.levelno >= logging.ERROR]
