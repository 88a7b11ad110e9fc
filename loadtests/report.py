"""From the runner's per-request samples to per-step figures, tables and PNG plots.

Definitions follow vLLM's `bench serve`: TTFT is send -> first streamed token; TPOT per request is
(latency - TTFT) / (output tokens - 1); ITL pools every gap between chunks; E2E is send -> end. Output
throughput spreads each request's tokens evenly between its first token and its end, and counts the ones that
fall inside the step; a stream cut off by the end of the run (or of a step that takes users away) counts the
tokens that had arrived, and is `interrupted`, not a failure. 429 and 503 answers are counted as `rejected`,
apart from other failures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

REJECTED = (429, 503)


def load_samples(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = next(line for line in lines if line.get("event") == "start")
    return header, [line for line in lines if "kind" in line]


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _tokens_in(sample: dict[str, Any], t0: float, t1: float) -> float:
    tokens = sample["tokens"]
    if not tokens:
        return 0.0
    begin, end = sample.get("first", sample["start"]), sample["end"]
    if end <= begin:
        return float(tokens) if t0 <= end < t1 else 0.0
    overlap = max(0.0, min(end, t1) - max(begin, t0))
    return tokens * overlap / (end - begin)


def summarise(header: dict[str, Any], samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step of the shape."""
    return summarise_rounds([(header, samples)])


def summarise_rounds(rounds: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per step, pooling the samples of several runs of the same shape (rounds against one server)."""
    rows = []
    starts = [header["time"] for header, _ in rounds]
    for index, step in enumerate(rounds[0][0]["steps"]):
        mine: list[dict[str, Any]] = []
        tokens = 0.0
        cut = 0
        for r, (_, samples) in enumerate(rounds):
            t0 = starts[r]
            t1 = starts[r] = t0 + step["seconds"]
            mine += [s for s in samples if s["step"] == index and not s.get("interrupted")]
            cut += sum(1 for s in samples if s["step"] == index and s.get("interrupted"))
            tokens += sum(_tokens_in(s, t0, t1) for s in samples if s["ok"] or s.get("interrupted"))
        seconds = step["seconds"] * len(rounds)
        ok = [s for s in mine if s["ok"]]
        streamed = [s for s in ok if s["kind"] == "stream_chat"]
        e2e = [s["end"] - s["start"] for s in ok]
        itl = [gap for s in streamed for gap in s.get("itl", [])]
        tpot = [s["tpot"] for s in streamed if s.get("tpot") is not None]
        ttft = [s["ttft"] for s in streamed]
        rows.append(
            {
                "users": step["users"],
                "seconds": seconds,
                "requests": len(mine),
                "completed": len(ok),
                "failures": sum(1 for s in mine if not s["ok"] and s["status"] not in REJECTED),
                "rejected": sum(1 for s in mine if not s["ok"] and s["status"] in REJECTED),
                "interrupted": cut,
                "output_tokens_per_s": tokens / seconds,
                "request_throughput": len(ok) / seconds,
                "ttft_p50": _pct(ttft, 50),
                "ttft_p95": _pct(ttft, 95),
                "tpot_p50": _pct(tpot, 50),
                "itl_p50": _pct(itl, 50),
                "itl_p95": _pct(itl, 95),
                "e2e_p50": _pct(e2e, 50),
                "e2e_p95": _pct(e2e, 95),
            }
        )
    return rows


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(rows: list[dict[str, Any]], title: str) -> str:
    head = f"{title}\n{'users':>6}{'reqs':>6}{'fail':>6}{'429/503':>8}{'cut':>5}{'out tok/s':>11}{'TTFT p50':>10}"
    head += f"{'TTFT p95':>10}{'TPOT p50':>10}{'ITL p50':>9}{'ITL p95':>9}{'E2E p50':>9}{'E2E p95':>9}"
    head += "   (latencies in ms)"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['users']:>6}{r['requests']:>6}{r['failures']:>6}{r['rejected']:>8}{r['interrupted']:>5}"
            f"{r['output_tokens_per_s']:>11.1f}"
            f"{_fmt(r['ttft_p50'], 1000, 0):>10}{_fmt(r['ttft_p95'], 1000, 0):>10}{_fmt(r['tpot_p50'], 1000):>10}"
            f"{_fmt(r['itl_p50'], 1000):>9}{_fmt(r['itl_p95'], 1000):>9}{_fmt(r['e2e_p50'], 1000, 0):>9}"
            f"{_fmt(r['e2e_p95'], 1000, 0):>9}"
        )
    return "\n".join(lines)


def comparison(ours: list[dict[str, Any]], peer: list[dict[str, Any]], names: tuple[str, str]) -> str:
    """Side by side, step by step, with ratios ours/peer (throughput: higher is better; TTFT: lower is)."""
    a, b = names
    w = max(len(a), len(b)) + 12
    lines = [
        f"{'users':>6}{a + ' tok/s':>{w}}{b + ' tok/s':>{w}}{'ratio':>8}"
        f"{a + ' TTFT p95':>{w}}{b + ' TTFT p95':>{w}}{'ratio':>8}   (TTFT in ms; ratio = first / second)"
    ]
    for x, y in zip(ours, peer, strict=False):
        tput = x["output_tokens_per_s"] / y["output_tokens_per_s"] if y["output_tokens_per_s"] else None
        ttft = x["ttft_p95"] / y["ttft_p95"] if x["ttft_p95"] and y["ttft_p95"] else None
        lines.append(
            f"{x['users']:>6}{x['output_tokens_per_s']:>{w}.1f}{y['output_tokens_per_s']:>{w}.1f}{_fmt(tput, 1, 2):>8}"
            f"{_fmt(x['ttft_p95'], 1000, 0):>{w}}{_fmt(y['ttft_p95'], 1000, 0):>{w}}{_fmt(ttft, 1, 2):>8}"
        )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Throughput and TTFT against users, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        users = [r["users"] for r in rows]
        left.plot(users, [r["output_tokens_per_s"] for r in rows], marker="o", label=name)
        right.plot(users, [(r["ttft_p50"] or np.nan) * 1000 for r in rows], marker="o", label=f"{name} p50")
        right.plot(
            users, [(r["ttft_p95"] or np.nan) * 1000 for r in rows], marker="x", linestyle="--", label=f"{name} p95"
        )
    left.set(xlabel="concurrent users", ylabel="output tokens/s", title="Output throughput")
    right.set(xlabel="concurrent users", ylabel="ms", title="Time to first token")
    for ax in (left, right):
        if len({r["users"] for rows in runs.values() for r in rows}) > 2:
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
