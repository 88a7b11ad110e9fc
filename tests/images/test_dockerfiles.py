"""The images, as far as this machine can check them without a container engine: hadolint, their shape, and
their Lambda entry points run with the image's environment and a file system read-only outside /tmp."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.functions.test_lambda import api_gateway_v2
from tests.servers import FNSERVE, running_server

ROOT = Path(__file__).parents[2]
DOCKERFILES = [ROOT / "Dockerfile.cpu", ROOT / "Dockerfile.cuda"]
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    done = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def stages(text: str) -> dict[str, str]:
    """Each stage's text by its name."""
    parts = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].split(" AS ")[-1].strip(): part for part in parts}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_is_multi_stage_non_root_health_checked_and_pinned(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    found = stages(text)
    assert {"build", "runtime", "lambda-adapter", "lambda-streaming"} <= set(found)
    runtime = found["runtime"]
    assert re.search(r"^USER 10001$", runtime, re.MULTILINE)
    assert re.search(r'^HEALTHCHECK .* CMD \["fnserve", "probe"\]$', runtime, re.MULTILINE)  # GET /readiness
    assert "fnserve prepare" in found["build"] + found["runtime"]  # the embedded models converted at build time
    assert re.search(r"^ARG BASE=", text, re.MULTILINE) and re.search(r"ARG TORCH_INDEX=", text)
    assert re.search(r"aws-lambda-adapter:[0-9.]+@sha256:[0-9a-f]{64}", text)  # the adapter by digest
    assert "/lambda-adapter" not in runtime  # only the streaming target carries the adapter
    assert "HF_HUB_OFFLINE" not in text  # hub models stay possible at run time (settings.hub_offline)
    assert "torch==2.13.0" in found["build"]


def runtime_env(dockerfile: Path, stage: str = "runtime") -> dict[str, str]:
    """A stage's own ENV, as the image sets it (build arguments at their defaults)."""
    text = dockerfile.read_text()
    arguments = build_arguments(dockerfile)
    runtime = stages(text)[stage].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return {name: re.sub(r"\$\{(\w+)\}", lambda m: arguments[m[1]], value) for name, value in env.items()}


def prepare_step(dockerfile: Path) -> str:
    """The shell command of the runtime stage's `fnserve prepare` step (without what follows it: `rm -rf /tmp/*`)."""
    runtime = stages(dockerfile.read_text())["runtime"].replace("\\\n", " ")
    step = next(line for line in runtime.splitlines() if line.startswith("RUN ") and "fnserve prepare" in line)
    return next(part.strip() for part in step[4:].split("&&") if "fnserve prepare" in part)


def build_arguments(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", dockerfile.read_text(), re.MULTILINE))


def test_lambda_entry_points_write_nothing_outside_tmp(tmp_path: Path) -> None:
    """The image's environment, its converted weights prepared and kernels compiled as the build does, then the
    chat, models and embeddings handlers under an audit hook that refuses any write outside the writable
    directory; the chat function's kernels come from the build's, copied into numba's empty cache."""
    cache = tmp_path / "opt-fnserve-cache"
    writable = tmp_path / "tmp"
    writable.mkdir()
    image = runtime_env(ROOT / "Dockerfile.cpu")
    assert image["NUMBA_CPU_NAME"] == "x86-64-v3" and image["NUMBA_CPU_FEATURES"] == ""  # any x86 host reads them
    env = {**os.environ, **image}
    env.pop("HF_HUB_OFFLINE", None)
    env |= {
        "PATH": os.environ["PATH"],
        "FNSERVE_CACHE_DIR": str(cache),
        "NUMBA_CACHE_DIR": str(writable / "numba"),
        "HF_HOME": str(writable / "huggingface"),
        "HOME": str(writable),
        "TMPDIR": str(writable),
        "FNSERVE_HUB_OFFLINE": "true",
    }
    models = ["smollm2-135m-instruct", "all-minilm-l6-v2"]  # what the handlers below use
    step = prepare_step(ROOT / "Dockerfile.cpu")
    assert step.startswith("NUMBA_CACHE_DIR=/opt/fnserve/cache/kernels fnserve prepare")  # where kernels are sought
    arguments = build_arguments(ROOT / "Dockerfile.cpu")
    assert arguments["KERNELS_FOR"] == "x86-64-v4+avx512vnni"  # 512-bit kernels beside x86-64-v3's
    # The build's own command, with the build arguments' defaults, this cache for the image's and our fnserve
    command = step.replace("/opt/fnserve/cache", str(cache)) + " " + " ".join(models)
    build_env = env | arguments | {"PATH": f"{FNSERVE.parent}:{os.environ['PATH']}"}
    prepared = subprocess.run(["bash", "-c", command], env=build_env, capture_output=True, text=True, timeout=900)
    assert prepared.returncode == 0, prepared.stderr
    assert "kernels compiled for x86-64-v4+avx512vnni" in prepared.stdout
    assert list((cache / "kernels").rglob("*attention*.nbc"))
    # The build runs as root and the image as uid 10001: whatever the build wrote must be readable by others.
    for path in cache.rglob("*"):
        assert path.stat().st_mode & (0o005 if path.is_dir() else 0o004), f"{path} is not readable by the image's user"
    assert list((cache / "packed").glob("SmolLM2*.safetensors"))  # the int4 weights, packed as a start needs them
    # Not "What is the capital of France?": SmolLM2's first token there is a near tie ('The' against 'L', 0.03-0.11
    # apart) that the kernels' float32 summation order decides, and the image's kernels are compiled for x86-64-v3.
    question = {"messages": [{"role": "user", "content": "Name the capital city of France."}], "temperature": 0}
    events: list[list[Any]] = [
        ["functions.models", api_gateway_v2("GET", "/v1/models")],
        ["functions.chat", api_gateway_v2("POST", "/v1/chat/completions", question)],
        ["functions.embeddings", api_gateway_v2("POST", "/v1/embeddings", {"input": ["a text"]})],
    ]
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "readonly_lambda.py"), str(writable)],
        input=json.dumps(events),
        env=env | {"NUMBA_DEBUG_CACHE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=writable,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "loaded packed weights from" in done.stderr  # mapped as prepared: neither packed again nor written
    assert "ignoring the packed weights" not in done.stderr and "could not keep" not in done.stderr
    loaded = [line for line in done.stdout.splitlines() if line.startswith("[cache] data loaded")]
    assert any("attention" in line for line in loaded), done.stdout[-2000:]  # found, not compiled
    assert not [line for line in done.stdout.splitlines() if line.startswith("[cache] data saved")]
    # The 512-bit kernels where this CPU runs them (told by the kernel's own list of its flags), else x86-64-v3's
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = set(next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split())
    avx512_vnni = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"} <= flags
    assert ("kernels: compiled for x86-64-v4+avx512vnni" in done.stderr) == avx512_vnni, done.stderr[-2000:]
    models, chat, embeddings = json.loads(done.stdout.splitlines()[-1])
    assert [r["statusCode"] for r in (models, chat, embeddings)] == [200, 200, 200], done.stdout[-2000:]
    assert "Paris" in json.loads(chat["body"])["choices"][0]["message"]["content"]
    assert len(json.loads(embeddings["body"])["data"][0]["embedding"]) == 384


def test_the_streaming_lambda_command_streams_through_the_service_port(tmp_path: Path) -> None:
    """What the web adapter forwards to: the lambda-streaming target's command and environment, outside a
    container; a chat stream arrives frame by frame on its port."""
    env = {k: v for k, v in runtime_env(ROOT / "Dockerfile.cpu", "lambda-streaming").items() if k != "FNSERVE_HOST"}
    assert env["AWS_LWA_INVOKE_MODE"] == "response_stream" and env["AWS_LWA_READINESS_CHECK_PATH"] == "/readiness"
    env |= {"NUMBA_CACHE_DIR": str(tmp_path / "numba"), "HF_HOME": str(tmp_path / "hf")}
    body = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 12, "stream": True}
    with running_server(tmp_path / "fnserve.log", env, ("--function", "chat")) as server:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
            frames = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert len(frames) > 3 and frames[-1] == "data: [DONE]"
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 404  # the chat function alone
