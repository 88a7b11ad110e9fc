"""Real `fnserve serve` processes for tests: started on a free port, stopped (and checked) at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

FNSERVE = Path(sys.executable).parent / "fnserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str  # base URL, without /v1
    proc: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send a signal and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"fnserve serve did not stop within {timeout} s:\n{self.log()[-3000:]}") from None


def launch(log_path: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Server:
    """Start a server without waiting for it."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "FNSERVE_LOG_FORMAT": "json", **(env or {})}
    scheme = "https" if "--ssl-certfile" in args else "http"
    log = log_path.open("w")  # a pipe nobody reads would fill up
    proc = subprocess.Popen(
        [str(FNSERVE), "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Server(f"{scheme}://127.0.0.1:{port}", proc, log_path)


def wait_until(server: Server, path: str = "/readiness", timeout: float = 300, verify: bool | str = True) -> None:
    """Until `path` answers 200; fails with the server's log if it exits first."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1, verify=verify) as client:  # one client: each builds a TLS context (~30 ms of CPU)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise AssertionError(f"fnserve serve exited with {server.proc.returncode}:\n{server.log()[-6000:]}")
            try:
                if client.get(f"{server.url}{path}").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"fnserve serve was not ready within {timeout} s:\n{server.log()[-6000:]}")


@contextmanager
def running_server(
    log_path: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (), verify: bool | str = True
) -> Iterator[Server]:
    server = launch(log_path, env, args)
    try:
        wait_until(server, verify=verify)
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()
