"""What constrained decoding costs: grammar compile time, the mask per token, and throughput at 16 streams.

    python -m loadtests.bench_structured [--users 16] [--tokens 128] [--rounds 3] [--out docs/bench/structured.json]

- compile: each schema of the tests compiled into its grammar, cold (a text not seen before) and cached,
  `--compiles` times each: p50 and p95 in milliseconds;
- mask: the time to compute and apply one token's mask and take the token, over the tokens of real replies;
- served: one `fnserve serve` process (default configuration) on 127.0.0.1; `--users` concurrent streams of
  `--tokens` tokens each, with a JSON schema on every request and without, alternated `--rounds` times. The
  schema asks for a long array, and the free requests set ignore_eos, so both runs generate the same count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench_single import free_port, wait_ready

PROMPT = [{"role": "user", "content": "List as many fruits as you can, as JSON."}]
LONG = {
    "type": "object",
    "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 500}},
    "required": ["fruits"],
    "additionalProperties": False,
}


def test_schemas() -> dict[str, str]:
    """The grammars the tests compile: the Person model, the small answer schema, json_object, tool calls."""
    from shared.generation.constraint import json_grammar
    from shared.protocol.structured import tool_plan
    from shared.settings import Settings
    from tests.functions.test_structured_outputs import TIME, WEATHER, Person
    from tests.shared.generation.test_constraint import SCHEMA

    tools = tool_plan([WEATHER, TIME], "auto", None, Settings(preload=[]))
    assert tools is not None and (calls := tools.grammar()) is not None
    return {
        "person": json_grammar(Person.model_json_schema()),
        "answer": json_grammar(SCHEMA),
        "json_object": json_grammar({"type": "object"}),
        "tools-auto": calls,
    }


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def compile_and_mask(compiles: int) -> dict[str, Any]:
    from shared.catalog import ModelCatalog
    from shared.generation.constraint import Constraint, Grammars
    from shared.generation.model import _eos_ids, load_tokenizer
    from shared.settings import Settings
    from shared.sources import resolve_generation_model

    settings = Settings(preload=[])
    path = resolve_generation_model(ModelCatalog(settings).config("default"), settings.cache_dir)
    tokenizer = load_tokenizer(path)
    grammars = Grammars(tokenizer, _eos_ids(path, tokenizer))
    vocab = grammars.tokenizer().vocab_size

    async def timed(text: str) -> float:
        started = time.perf_counter()
        await grammars.compile(text, "response_format", 30.0)
        return (time.perf_counter() - started) * 1000

    out: dict[str, Any] = {"compile_ms": {}}
    for name, text in test_schemas().items():
        cold = []  # a new text each time: grammars are cached by their text (a Lark comment, or a JSON title)
        for i in range(compiles):
            fresh = text + f"\n// {i}\n" if text.startswith("start") else _retitled(text, i)
            cold.append(asyncio.run(timed(fresh)))
        asyncio.run(timed(text))  # into the cache
        cached = [asyncio.run(timed(text)) for _ in range(compiles)]
        out["compile_ms"][name] = {
            "cold_p50": statistics.median(cold),
            "cold_p95": pct(cold, 0.95),
            "cached_p50": statistics.median(cached),
            "cached_p95": pct(cached, 0.95),
        }
    import numpy as np

    compiled = asyncio.run(grammars.compile(test_schemas()["person"], "response_format", 30.0))
    reply = '{"name": "Ada", "age": 36, "favourite_colour": "blue", "nickname": null, "home": {"city": "London", '
    reply += '"country": "England"}, "hobbies": ["chess", "poetry"]}'
    tokens = tokenizer.encode(reply, add_special_tokens=False)
    logits = np.zeros(49152, dtype=np.float32)
    times = []
    for _ in range(20):
        constraint = Constraint(compiled, vocab)
        for token in tokens:
            started = time.perf_counter()
            constraint.mask(logits)
            constraint.advance(token)
            times.append((time.perf_counter() - started) * 1e6)
    out["mask_us"] = {"p50": statistics.median(times), "p95": pct(times, 0.95), "tokens": len(times)}
    return out


def _retitled(text: str, i: int) -> str:
    grammar = json.loads(text)
    for g in grammar.get("grammars", []):
        if "json_schema" in g:
            g["json_schema"]["title"] = f"run-{i}"
    return json.dumps(grammar)


async def burst(url: str, users: int, tokens: int, constrained: bool) -> tuple[int, float]:
    """(tokens generated, seconds) for `users` concurrent streamed requests."""
    body: dict[str, Any] = {"model": "default", "messages": PROMPT, "max_tokens": tokens, "temperature": 0.7}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "fruits", "schema": LONG}}
    else:
        body |= {"ignore_eos": True, "min_tokens": tokens}

    async def one(client: httpx.AsyncClient, seed: int) -> int:
        count = 0
        payload = {**body, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        count = int(usage["completion_tokens"])
        return count

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(client, seed) for seed in range(users)))
        return sum(counts), time.perf_counter() - started


def served(users: int, tokens: int, rounds: int) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FNSERVE_")}  # the default configuration
    env |= {"HF_HUB_OFFLINE": "1", "FNSERVE_LOG_LEVEL": "warning"}
    fnserve = str(Path(sys.executable).parent / "fnserve")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([fnserve, "serve", "--port", str(port)], env=env, stdout=log, stderr=log)
    try:
        wait_ready(url, proc, 300, path="/readiness")
        asyncio.run(burst(url, users, 16, True))  # warm: the grammar compiled and cached, kernels run once
        runs: dict[str, list[float]] = {"constrained": [], "free": []}
        for _ in range(rounds):
            for name in ("free", "constrained"):
                count, seconds = asyncio.run(burst(url, users, tokens, name == "constrained"))
                runs[name].append(count / seconds)
                print(f"{name}: {count} tokens in {seconds:.2f} s = {count / seconds:.1f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    free, constrained = statistics.median(runs["free"]), statistics.median(runs["constrained"])
    return {"users": users, "tokens": tokens, "runs": runs, "ratio": constrained / free}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_structured", description=__doc__)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compiles", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = compile_and_mask(args.compiles)
    print(json.dumps(result, indent=1))
    result["served"] = served(args.users, args.tokens, args.rounds)
    print(f"constrained / free at {args.users} streams: {result['served']['ratio']:.3f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
