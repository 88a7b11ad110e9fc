"""A conversation's next turn: its time to first token, fnserve against llama.cpp's llama-server on the same GGUF.

    python -m loadtests.bench_turns [--conversations 6] [--reply-tokens 160] [--peer-slots 4]

Each conversation asks for a long paragraph (greedy, up to `--reply-tokens`), then sends that reply back with a
follow-up question, as a chat client does, and times the second turn's first token: what a server keeps of the
first turn (its prompt, and its reply) decides how much of the second it computes again. The servers take turns
conversation by conversation. The peer is $LLAMA_SERVER or the build under ~/.cache/fnserve-peer; without it
fnserve is measured alone.
"""

from __future__ import annotations

import argparse
import os
import statistics

from loadtests.bench_single import fnserve_and_peer, stream_chat

TOPICS = ["the sea", "mountains", "a city at night", "an old library", "the first snow", "a busy market", "a train"]
FOLLOW_UP = "Now make it shorter."


def chat(url: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, str]:
    """(time to the first text, the whole text) of one greedy streamed chat request."""
    body = {"model": "default", "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    sent, stamps, text = stream_chat(url, body)
    return (stamps[0] - sent if stamps else float("nan")), text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--reply-tokens", type=int, default=160)
    parser.add_argument("--peer-slots", type=int, default=4, help="llama-server's -np")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    peer_args = ["-np", str(args.peer_slots), "-c", str(2048 * args.peer_slots)]
    with fnserve_and_peer(args.threads, peer_args) as servers:
        second: dict[str, list[float]] = {name: [] for name in servers}
        for i in range(args.conversations):
            question = {"role": "user", "content": f"Write a long paragraph about {TOPICS[i % len(TOPICS)]}."}
            for name, url in servers.items():
                _, reply = chat(url, [question], args.reply_tokens)
                turn = [question, {"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UP}]
                ttft, _ = chat(url, turn, 8)
                second[name].append(ttft)
                print(f"{name:14s} conversation {i + 1}: second turn's TTFT {ttft * 1e3:.0f} ms", flush=True)
    print(f"{'server':14s} {'TTFT p50 ms':>12s} {'min-max ms':>12s}")
    for name, times in second.items():
        low, high = min(times) * 1e3, max(times) * 1e3
        print(f"{name:14s} {statistics.median(times) * 1e3:12.0f} {f'{low:.0f}-{high:.0f}':>12s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
