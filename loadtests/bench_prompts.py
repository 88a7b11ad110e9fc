"""Time to first token of long prompts, fnserve against llama.cpp's llama-server on the same GGUF.

    python -m loadtests.bench_prompts [--words 100 400 800 1500] [--rounds 3]

A document of `--words` words (each request its own, so no server finds it cached) is sent with a question, as
a retrieval-augmented chat client does, and the time to the first token of the reply is taken: nearly all of
it is computing the prompt. The servers take turns request by request, one request at a time, llama-server
with one slot. The peer is $LLAMA_SERVER or the build under ~/.cache/fnserve-peer; without it fnserve is
measured alone.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

import httpx

from loadtests.bench_single import fnserve_and_peer
from loadtests.bench_turns import chat

WORDS = (
    "the river stone market winter lamp harbour bread letter garden engine window clock salt field "
    "morning paper silver road station bridge music village candle mountain ship rain"
).split()


def document(words: int, seed: int) -> str:
    """A request's own prompt: a numbered document of `words` words, then the question about it."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Document {seed}:\n{text}\n\nWhich word comes up most often in the document?"


def prompt_tokens(url: str, text: str) -> int:
    body = {"model": "default", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return int(response.json()["usage"]["prompt_tokens"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, nargs="+", default=[100, 400, 800, 1500])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    rows = []
    seed = 0
    with fnserve_and_peer(args.threads, ["-np", "1", "-c", "4096"]) as servers:
        for words in args.words:
            tokens = prompt_tokens(servers["fnserve"], document(words, -words))
            ttft: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, url in servers.items():
                    seed += 1
                    ttft[name].append(chat(url, [{"role": "user", "content": document(words, seed)}], 2)[0])
            medians = {name: statistics.median(times) for name, times in ttft.items()}
            rows.append((words, tokens, medians))
            print(f"{words} words ({tokens} tokens): " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in medians.items()))
    names = list(rows[0][2]) if rows else []
    print(f"{'words':>6s} {'tokens':>7s} " + " ".join(f"{n + ' TTFT ms':>20s}" for n in names) + f" {'ratio':>7s}")
    for words, tokens, medians in rows:
        ratio = medians["llama-server"] / medians["fnserve"] if "llama-server" in medians else float("nan")
        line = " ".join(f"{medians[n] * 1e3:20.0f}" for n in names)
        print(f"{words:6d} {tokens:7d} {line} {ratio:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
