"""Decode steps of the torch path in one process, as they come and as CUDA graphs replay them: the time of a step
at a few row counts, with no HTTP, tokenizer or sampling around it (what the GPU check's sweep cannot separate).

    python -m loadtests.bench_steps MODEL_DIR --device cuda [--rows 1,16,48] [--steps 50] [--out steps.json]

MODEL_DIR is a Hugging Face-format Llama-family checkpoint (the GPU check's random SmolLM2-shaped one). Every
slot is filled with a 200-token prompt first; each row count then runs `--steps` decode steps a configuration,
the two configurations alternated twice, and the medians are printed (ms a step, tokens a second), after what
each runner's start took (on CUDA with the device memory it holds, the graphs' captures included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.backends.llama import LlamaRunner
from shared.backends.llama_config import LlamaConfig

PROMPT = 200  # positions each slot holds before the timed steps


def _runner(
    model_dir: Path, config: LlamaConfig, device: str, dtype: torch.dtype, slots: int, graphs: bool
) -> LlamaRunner:
    cuda = torch.device(device).type == "cuda"
    held, started = torch.cuda.memory_allocated(device) if cuda else 0, time.perf_counter()
    runner = LlamaRunner(
        model_dir, config, dtype=dtype, quantization="none", slots=slots, max_len=1024, device=device, graphs=graphs
    )
    memory = f", {(torch.cuda.memory_allocated(device) - held) / 2**20:.0f} MiB" if cuda else ""
    print(f"{'graphs' if graphs else 'eager'} runner: started in {time.perf_counter() - started:.1f} s{memory}")
    rng = np.random.default_rng(0)
    for slot in range(slots):
        runner.prefill(slot, rng.integers(0, config.vocab_size, PROMPT).tolist(), 0)
    return runner


def _time(runner: LlamaRunner, rows: int, steps: int) -> float:
    """Median seconds of a decode step of `rows` rows, after two untimed ones."""
    times = []
    for k in range(steps + 2):
        started = time.perf_counter()
        runner.decode([1] * rows, [PROMPT + k % 100] * rows)  # .decode returns numpy: the device has finished
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def bench(model_dir: Path, device: str, rows: list[int], steps: int, dtype: str = "bfloat16") -> list[dict[str, Any]]:
    config = LlamaConfig.from_dir(model_dir)
    if config is None:
        raise SystemExit(f"{model_dir}: not a checkpoint the batched runner implements")
    slots = max(rows)
    runners = {g: _runner(model_dir, config, device, getattr(torch, dtype), slots, g) for g in (False, True)}
    results: dict[tuple[int, bool], list[float]] = {}
    for _ in range(2):
        for n in rows:
            for graphs, runner in runners.items():
                results.setdefault((n, graphs), []).append(_time(runner, n, steps))
    out = []
    for n in rows:
        eager_s, graphs_s = min(results[n, False]), min(results[n, True])
        out.append({"rows": n, "eager_ms": eager_s * 1e3, "graphs_ms": graphs_s * 1e3, "speedup": eager_s / graphs_s})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", default="1,16,48")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = [int(n) for n in args.rows.split(",")]
    results = bench(args.model_dir, args.device, rows, args.steps, args.dtype)
    print(f"decode steps on {args.device} ({args.dtype}), medians of {args.steps}, the better of two alternations")
    print(f"{'rows':>5} {'eager ms':>10} {'graphs ms':>10} {'speedup':>8} {'eager tok/s':>12} {'graphs tok/s':>13}")
    for r in results:
        n, eager, graphs = r["rows"], r["eager_ms"], r["graphs_ms"]
        rates = f"{n / eager * 1e3:>12.0f} {n / graphs * 1e3:>13.0f}"
        print(f"{n:>5} {eager:>10.2f} {graphs:>10.2f} {r['speedup']:>8.2f} {rates}")
    if args.out:
        args.out.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "steps": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
