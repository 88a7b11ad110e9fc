"""How faithful each quantization is to the model's own weights: KL divergence and top-token agreement.

    python -m loadtests.faithfulness [--tokens 2000] [--text docs/engine.md]

The method of llama.cpp's `perplexity --kl-divergence`: over a fixed text, teacher-forced one token at a time,
each configuration's next-token distribution is compared with float32's (the de-quantised GGUF computed
exactly): mean KL(float32 || config), the share of positions whose most likely token is the same, and each
one's perplexity of the text. Prints a table; writes the figures as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--text", default="docs/engine.md", help="the fixed text (a file of this repository)")
    parser.add_argument("--configs", default="int4,int8,mixed", help="quantizations to compare with float32")
    parser.add_argument("--out", help="write the figures here (JSON)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from shared.backends.llama import LlamaConfig, LlamaRunner
    from shared.settings import Settings
    from shared.sources import resolve_generation_model

    settings = Settings(preload=[])
    path = resolve_generation_model(settings.all_models[0], settings.cache_dir, settings.hub_offline)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(Path(args.text).read_text())["input_ids"][: args.tokens + 1]
    config = LlamaConfig.from_dir(path)
    assert config is not None

    def distributions(quantization: str, dtype: torch.dtype) -> tuple[np.ndarray, float]:
        """Log-probabilities of every next token, teacher-forced one step at a time (decode rows, as served)."""
        runner = LlamaRunner(path, config, dtype=dtype, quantization=quantization, slots=1, max_len=len(ids) + 1)  # type: ignore[arg-type]
        started = time.perf_counter()
        out = [log_softmax(runner.prefill(0, ids[:1], 0))]
        for position in range(1, len(ids) - 1):
            out.append(log_softmax(runner.decode([ids[position]], [position])[0]))
        return np.stack(out), time.perf_counter() - started

    reference, seconds = distributions("none", torch.float32)
    targets = np.asarray(ids[1:])
    rows: list[dict[str, Any]] = []

    def row(name: str, logp: np.ndarray, took: float) -> dict[str, Any]:
        kl = (np.exp(reference) * (reference - logp)).sum(-1)
        same = (logp.argmax(-1) == reference.argmax(-1)).mean()
        ppl = float(np.exp(-logp[np.arange(len(targets)), targets].mean()))
        return {
            "config": name,
            "mean_kl": float(kl.mean()),
            "p99_kl": float(np.quantile(kl, 0.99)),
            "same_top_token": float(same),
            "perplexity": ppl,
            "seconds": round(took, 1),
        }

    rows.append(row("float32", reference, seconds))
    for quantization in args.configs.split(","):
        dtype = torch.float32 if quantization == "none" else torch.bfloat16
        logp, took = distributions(quantization, dtype)
        rows.append(row(f"{quantization} (bfloat16)", logp, took))
    print(f"{len(targets)} tokens of {args.text}, teacher-forced; KL(float32 || config) in nats")
    print(f"{'config':20s} {'mean KL':>9s} {'p99 KL':>9s} {'same top':>9s} {'perplexity':>11s} {'s':>6s}")
    for r in rows:
        print(
            f"{r['config']:20s} {r['mean_kl']:9.5f} {r['p99_kl']:9.4f} {r['same_top_token']:9.1%} "
            f"{r['perplexity']:11.3f} {r['seconds']:6.1f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"tokens": len(targets), "text": args.text, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
