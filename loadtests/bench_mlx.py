"""MLX batched against MLX's per-sequence loop: concurrent greedy streams through the engine, in one process.

    python -m loadtests.bench_mlx [--model default] [--streams 16] [--tokens 32] [--rounds 2]

Each round loads the model under `engine=batched`, then `engine=simple`, warms it with two short requests, and
sends `--streams` completions of `--tokens` tokens at once (distinct prompts, ignore_eos). Prints output tokens
a second for each; the rounds interleave the two so that a slower stretch of the machine hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from shared.catalog import ModelCatalog
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.settings import Settings


async def _throughput(model: GenerationModel, prompts: list[list[int]], params: SamplingParams) -> float:
    async def one(prompt: list[int]) -> int:
        return len([step async for step in model.generate(prompt, params)])

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(p) for p in prompts))
    return sum(tokens) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_mlx", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for engine in ("batched", "simple"):
            catalog = ModelCatalog(Settings(backend="mlx", engine=engine, preload=[], max_running=args.streams))
            try:
                model = catalog.generation(args.model)
                prompts = [model.encode(f"Tell me a story about the number {i}.") for i in range(args.streams)]
                asyncio.run(_throughput(model, prompts[:2], SamplingParams(temperature=0.0, max_tokens=4)))
                params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
                rate = asyncio.run(_throughput(model, prompts, params))
                print(f"{args.model} {engine}: {rate:.1f} tok/s at {args.streams} streams", flush=True)
            finally:
                catalog.close()


if __name__ == "__main__":
    main()
