"""Headless load-test runner: a scenario against a URL (and optionally a second one), with a report.

    python -m loadtests.run --url http://127.0.0.1:8000 --scenario sweep --steps 1,4,16,64 --hold 30
    fnserve loadtest --url http://127.0.0.1:8000 --scenario smoke --compare http://127.0.0.1:8080

Writes into --out (default loadtests/results/<time>/): for each target, Locust's CSV files and HTML report
and the raw per-request samples (samples.jsonl; a folder per round with --rounds); then summary.json (per
step: users, requests, failures, rejected, output tokens/s, TTFT p50/p95, TPOT p50, ITL p50/p95, E2E p50/p95,
every round's samples pooled) and plot.png (throughput and TTFT against users). Exits 1 when the share of
failed requests (429/503 included) passes --max-failure-rate, so it can gate a deploy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtests import report

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PROG = "fnserve loadtest"


def run_target(
    name: str, url: str, model: str, args: argparse.Namespace, folder: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One Locust run against one server: its header and per-request samples (also kept in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = folder / "samples.jsonl"
    samples.unlink(missing_ok=True)
    env = {
        **os.environ,
        "FNSERVE_LT_SCENARIO": args.scenario,
        "FNSERVE_LT_STEPS": args.steps,
        "FNSERVE_LT_HOLD": str(args.hold),
        "FNSERVE_LT_USERS": str(args.users),
        "FNSERVE_LT_DURATION": str(args.duration),
        "FNSERVE_LT_SPIKE": args.spike,
        "FNSERVE_LT_MODEL": model,
        "FNSERVE_LT_MAX_TOKENS": str(args.max_tokens),
        "FNSERVE_LT_FIXED_LENGTH": "1" if args.fixed_length else "0",
        "FNSERVE_LT_WEIGHTS": args.mix,
        "FNSERVE_LT_THINK": args.think,
        "FNSERVE_LT_SAMPLES": str(samples),
    }
    if args.api_key:
        env["FNSERVE_LT_API_KEY"] = args.api_key
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "--csv", str(folder / "locust"), "--html", str(folder / "report.html"), "--only-summary",
        "--loglevel", "WARNING", "--stop-timeout", str(args.stop_timeout),
    ]  # fmt: skip
    print(f"== {name}: {args.scenario} against {url}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=False, cwd=Path(__file__).resolve().parents[1])
    if not samples.exists():
        raise SystemExit(f"locust wrote no samples for {name} ({url}); is the server up?")
    header, rows = report.load_samples(samples)
    print(report.table(report.summarise(header, rows), f"{name} ({time.perf_counter() - started:.0f} s)"), flush=True)
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL, without /v1")
    parser.add_argument("--scenario", choices=["smoke", "sweep", "spike"], default="smoke")
    parser.add_argument("--steps", default="1,4,16,64", help="sweep: user counts")
    parser.add_argument("--hold", type=float, default=30, help="sweep: seconds per step")
    parser.add_argument("--users", type=int, default=2, help="smoke: users")
    parser.add_argument("--duration", type=float, default=20, help="smoke: seconds")
    parser.add_argument("--spike", default="2,32,15,15,15", help="spike: base,peak,before,at peak,after seconds")
    parser.add_argument("--mix", default="stream_chat=1", help="user weights: stream_chat,chat,completions,embeddings")
    parser.add_argument("--think", default="0", help="seconds between a user's requests: 0 or low-high")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-fixed-length", dest="fixed_length", action="store_false", help="let models stop early")
    parser.add_argument("--model", default="default")
    parser.add_argument("--api-key")
    parser.add_argument("--compare", metavar="URL2", help="run the same scenario against a second server")
    parser.add_argument("--compare-model", default="default")
    parser.add_argument("--names", default="fnserve,peer", help="labels of the two targets")
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --compare: run the scenario this many times on each, alternating"
    )
    parser.add_argument("--max-failure-rate", type=float, default=0.01)
    parser.add_argument("--stop-timeout", type=int, default=30, help="whole seconds running requests get to finish")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    out = args.out or Path("loadtests/results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    names = args.names.split(",")
    targets = [(names[0], args.url, args.model)]
    if args.compare:
        targets.append((names[1], args.compare, args.compare_model))
    rounds = max(1, args.rounds) if args.compare else 1
    # Rounds alternate between the servers, so a slow spell of a shared machine falls on both alike.
    samples: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]] = {name: [] for name, _, _ in targets}
    for r in range(rounds):
        for name, url, model in targets:
            folder = out / name if rounds == 1 else out / name / f"round-{r + 1}"
            samples[name].append(run_target(name, url, model, args, folder))
    runs = {name: report.summarise_rounds(pooled) for name, pooled in samples.items()}
    if args.compare:
        if rounds > 1:
            for name in names[:2]:
                print("\n" + report.table(runs[name], f"{name}, {rounds} rounds pooled"))
        print("\n" + report.comparison(runs[names[0]], runs[names[1]], (names[0], names[1])))
    (out / "summary.json").write_text(json.dumps({"scenario": args.scenario, "runs": runs}, indent=2))
    report.plot(runs, out / "plot.png")
    print(f"\nwrote {out}/summary.json and {out}/plot.png")

    gate = runs[names[0]]
    requests = sum(r["requests"] for r in gate)
    failed = sum(r["failures"] + r["rejected"] for r in gate)
    if requests == 0:
        print("FAILED: no request ended within the run (streams cut off at its end are not counted)")
        return 1
    rate = failed / requests
    if rate > args.max_failure_rate:
        print(f"FAILED: {failed} of {requests} requests failed ({rate:.1%} > {args.max_failure_rate:.1%})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
