"""`make image`: build the CPU image with podman and run it in its modes, with the image's own files.

Base images cannot be pulled here, so the base is made from Debian's packages (mmdebstrap: bookworm's Python
3.11) and imported; pip inside the build reaches what the host reaches (its CA bundle and pip configuration,
with the folder of local wheels, are mounted into the RUN steps). Then, each in a container that runs as the
image's user with a read-only root file system and /tmp writable:
- the service (`fnserve serve`) answers /v1/models and a chat completion from the embedded model;
- the HEALTHCHECK passes; the user is not root; nothing outside /tmp can be written;
- the Lambda mode (`python -m awslambdaric functions.models.handler`) answers an API Gateway event through a
  local stand-in of the Lambda Runtime API.
Prints the image's size and the service's start time. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))

from tests.functions.test_lambda import RuntimeAPI, api_gateway_v2  # noqa: E402
from tests.servers import free_port  # noqa: E402

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
# Every container runs as Lambda would: the host's network, a read-only root file system, /tmp writable.
LOCKED_DOWN = ["--network", "host", "--read-only", "--tmpfs", "/tmp:rw,mode=1777"]
BASE = "localhost/fnserve-base:bookworm"
IMAGE = "localhost/fnserve-cpu:local"
CONTAINERS_CONF = (
    '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
)


def podman(*args: str, check: bool = True, capture: bool = False, timeout: float = 3600) -> str:
    command = [*PODMAN, *args]
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, check=False, text=True, capture_output=capture, timeout=timeout)
    if check and done.returncode != 0:
        raise SystemExit(f"podman {args[0]} failed ({done.returncode}): {done.stderr if capture else ''}")
    return done.stdout if capture else ""


def make_base(work: Path) -> None:
    if subprocess.run(["podman", "image", "exists", BASE], check=False).returncode == 0:
        return
    tarball = work / "bookworm.tar"
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates,passwd",
            "bookworm",
            str(tarball),
        ],
        check=True,
    )
    podman("import", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE)


def host_pip(work: Path) -> list[str]:
    """Mounts that give RUN steps the host's pip settings: its find-links folders (where the CPU torch wheel
    lies), constraints, index and CA bundle, in a pip.conf written for the build."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    wanted: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]
        if name in ("find-links", "constraint", "index-url"):
            wanted[name] = value.strip().strip("'\"")
    conf = work / "pip.conf"
    conf.write_text(
        "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" + "".join(f"{k} = {v}\n" for k, v in wanted.items())
    )
    mounts = [
        "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
        f"{conf}:/etc/pip.conf:ro",
    ]
    for name in ("find-links", "constraint"):
        for path in wanted.get(name, "").split():
            if Path(path).exists():
                mounts.append(f"{path}:{path}:ro")
    return mounts


def build(dockerfile: str, target: str, tag: str, mounts: list[str]) -> None:
    podman(
        "build",
        "--format",
        "docker",  # the OCI format has no HEALTHCHECK
        "--isolation",
        "chroot",
        "--network",
        "host",
        *[f"--volume={m}" for m in mounts],
        "--build-arg",
        f"BASE={BASE}",
        "--build-arg",
        "TORCH_INDEX=https://pypi.org/simple",
        "--target",
        target,
        "--file",
        dockerfile,
        "--tag",
        tag,
        str(ROOT),
    )


def run_service() -> float:
    """Start the service container, check it; its start time (run to ready) in seconds."""
    port = free_port()
    name = "fnserve-image-check"
    podman("rm", "--force", name, check=False, capture=True)
    started = time.monotonic()
    podman(
        "run",
        "--detach",
        "--name",
        name,
        *LOCKED_DOWN,
        "--env",
        f"FNSERVE_PORT={port}",
        IMAGE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while time.monotonic() - started < 600:
            try:
                if httpx.get(f"{url}/readiness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the service never became ready:\n" + podman("logs", name, capture=True, check=False))
        ready = time.monotonic() - started
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert "smollm2-135m-instruct" in [m["id"] for m in models["data"]], models
        question = {"messages": [{"role": "user", "content": "Name the capital city of France."}], "temperature": 0}
        answer = httpx.post(f"{url}/v1/chat/completions", json=question, timeout=120).json()
        text = answer["choices"][0]["message"]["content"]
        assert "Paris" in text, answer
        print(f"service: /v1/models lists {len(models['data'])} models; chat answered {text!r}")
        podman("healthcheck", "run", name)
        print("service: HEALTHCHECK passed")
        user = podman("exec", name, "id", "-u", capture=True).strip()
        assert user == "10001", user
        denied = subprocess.run([*PODMAN, "exec", name, "touch", "/opt/fnserve/x"], capture_output=True, text=True)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr
        podman("exec", name, "touch", "/tmp/x")
        print(f"service: runs as uid {user}; / is read-only, /tmp writable")
        return ready
    finally:
        podman("rm", "--force", "--time", "30", name, check=False, capture=True)


def run_lambda() -> None:
    RuntimeAPI.events, RuntimeAPI.answers = [], {}
    RuntimeAPI.done.clear()
    RuntimeAPI.events.append({"id": "inv-1", "payload": api_gateway_v2("GET", "/v1/models")})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), RuntimeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    proc = subprocess.Popen(
        [
            *PODMAN,
            "run",
            "--rm",
            *LOCKED_DOWN,
            "--env",
            f"AWS_LAMBDA_RUNTIME_API={address}",
            IMAGE,
            "python",
            "-m",
            "awslambdaric",
            "functions.models.handler",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not RuntimeAPI.answers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        RuntimeAPI.done.set()
        time.sleep(1)
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
        server.shutdown()
    answer = RuntimeAPI.answers.get("/2018-06-01/runtime/invocation/inv-1/response")
    if answer is None:
        raise SystemExit(f"the Lambda mode gave no answer:\n{output}")
    assert answer["statusCode"] == 200, answer
    ids = [m["id"] for m in json.loads(answer["body"])["data"]]
    print(f"lambda: awslambdaric answered an API Gateway v2 event with {answer['statusCode']}: {ids}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "fnserve-image"), help="scratch folder")
    parser.add_argument("--skip-build", action="store_true", help="check the image built before")
    args = parser.parse_args()
    for tool in ("podman", "mmdebstrap", "runc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install podman runc mmdebstrap")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(conf)
    if not args.skip_build:
        make_base(work)
        started = time.monotonic()
        build("Dockerfile.cpu", "runtime", IMAGE, host_pip(work))
        print(f"build: {time.monotonic() - started:.0f} s")
    size = json.loads(podman("image", "inspect", IMAGE, capture=True))[0]["Size"]
    print(f"image: {IMAGE}, {size / 1e6:.0f} MB")
    ready = run_service()
    print(f"service: ready {ready:.1f} s after podman run")
    run_lambda()
    print("image check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
