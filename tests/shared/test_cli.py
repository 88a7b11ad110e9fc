"""The `fnserve` command: `serve` as a real process, and the client commands against it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.servers import FNSERVE, free_port, running_server


def fnserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FNSERVE), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def test_the_openai_client_chats_with_the_served_default_model(server_url: str) -> None:
    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    assert "smollm2-135m-instruct" in [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "Name the capital city of France."}]
    reply = client.chat.completions.create(model="default", messages=messages, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"


def test_chat_command_answers_plain_and_streamed(server_url: str) -> None:
    env = {"FNSERVE_URL": f"{server_url}/v1"}
    plain = fnserve("chat", "Name the capital city of France.", "--temperature", "0", env=env)
    assert plain.returncode == 0 and "Paris" in plain.stdout
    streamed = fnserve("chat", "Name the capital city of France.", "--temperature", "0", "--stream", env=env)
    assert streamed.stdout == plain.stdout


def test_chat_command_replies_in_json_for_a_schema_file(server_url: str, tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    path = tmp_path / "place.json"
    path.write_text(json.dumps(schema))
    env = {"FNSERVE_URL": f"{server_url}/v1"}
    ask = ["chat", "Name a famous city.", "--json-schema", str(path), "--temperature", "0"]
    done = fnserve(*ask, env=env)
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), schema)
    streamed = fnserve(*ask, "--stream", env=env)
    assert streamed.stdout == done.stdout
    (tmp_path / "broken.json").write_text("{not json")
    broken = fnserve("chat", "hi", "--json-schema", str(tmp_path / "broken.json"), env=env)
    assert broken.returncode != 0 and "broken.json" in broken.stderr


def test_chat_command_lists_models(server_url: str) -> None:
    listed = fnserve("chat", "--list-models", "--url", f"{server_url}/v1")
    assert listed.returncode == 0
    assert "smollm2-135m-instruct\tchat" in listed.stdout and "all-minilm-l6-v2\tembedding" in listed.stdout


def test_embed_command_prints_one_vector_per_text(server_url: str) -> None:
    done = fnserve("embed", "first text", "second text", "--url", f"{server_url}/v1")
    vectors = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)


def test_client_commands_say_clearly_when_no_server_answers() -> None:
    done = fnserve("chat", "hi", "--url", f"http://127.0.0.1:{free_port()}/v1")
    assert done.returncode == 1 and "Connection error" in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_a_backend_that_cannot_run() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = fnserve("serve", "--port", str(free_port()), env={"FNSERVE_BACKEND": "cuda"})
    assert done.returncode == 2
    assert "backend 'cuda' was asked for" in done.stderr


def test_serve_reports_invalid_settings_readably() -> None:
    done = fnserve("serve", env={"FNSERVE_DEFAULT_MODEL": "nope"})
    assert done.returncode == 2
    assert "default_model='nope'" in done.stderr and "Traceback" not in done.stderr


def test_loadtest_and_bench_take_their_own_options() -> None:
    loadtest = fnserve("loadtest", "--help")
    assert loadtest.returncode == 0 and "--scenario" in loadtest.stdout and "fnserve loadtest" in loadtest.stdout
    bench = fnserve("bench", "--help")
    assert bench.returncode == 0 and "--configs" in bench.stdout


def test_serve_runs_one_function_alone(tmp_path: Path) -> None:
    """The models function alone: its routes only, ready at once, and no model framework in the process."""
    with running_server(tmp_path / "fnserve.log", {}, ("--function", "models")) as server:
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/readiness", timeout=30).status_code == 200
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}, timeout=30)
        assert chat.status_code == 404 and chat.json()["error"]["code"] == "unknown_url"
        libraries = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "libtorch" not in libraries and "onnxruntime" not in libraries  # it preloads no model


def test_probe_says_whether_the_local_server_is_ready(tmp_path: Path) -> None:
    with running_server(tmp_path / "fnserve.log", {"FNSERVE_PRELOAD": "[]"}) as server:
        port = server.url.rsplit(":", 1)[1]
        assert fnserve("probe", env={"FNSERVE_PORT": port}).returncode == 0
        assert fnserve("probe", "--path", "/health", env={"FNSERVE_PORT": port}).returncode == 0
        assert fnserve("probe", "--path", "/nowhere", env={"FNSERVE_PORT": port}).returncode == 1
    stopped = fnserve("probe", env={"FNSERVE_PORT": port})
    assert stopped.returncode == 1 and "/readiness" in stopped.stderr


def test_prepare_compiles_kernels_for_more_cpus_only_beside_a_named_baseline(tmp_path: Path) -> None:
    """--kernels-for adds targets to an image's prebuilt kernels: a name that is no target, or a process whose
    kernels would not land where starts seek them, is refused before any work."""
    wrong = fnserve("prepare", "--kernels-for", "cascadelake")
    assert wrong.returncode == 2 and "expected an x86-64 level" in wrong.stderr
    env = {"FNSERVE_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "", "NUMBA_CACHE_DIR": str(tmp_path / "kernels")}
    unnamed = fnserve("prepare", "--kernels-for", "x86-64-v4+avx512vnni", env=env)
    assert unnamed.returncode == 2 and "needs NUMBA_CPU_NAME" in unnamed.stderr
    elsewhere = fnserve("prepare", "--kernels-for", "x86-64-v4", env=env | {"NUMBA_CPU_NAME": "x86-64-v3",
                        "NUMBA_CACHE_DIR": str(tmp_path / "numba")})  # fmt: skip
    assert elsewhere.returncode == 2 and f"needs NUMBA_CACHE_DIR={tmp_path / 'kernels'}" in elsewhere.stderr
    assert list(tmp_path.iterdir()) == []  # nothing converted


def test_serve_refuses_a_kernel_cpu_that_was_not_prebuilt(tmp_path: Path) -> None:
    done = fnserve("serve", "--port", str(free_port()), env={"FNSERVE_CACHE_DIR": str(tmp_path),
                   "FNSERVE_KERNEL_CPU": "x86-64-v3", "FNSERVE_BACKEND": "cpu"})  # fmt: skip
    assert done.returncode == 2 and "kernel_cpu 'x86-64-v3': no list of prebuilt kernels" in done.stderr
    assert "Traceback" not in done.stderr
