from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.settings import Settings, SettingsError
from tests.servers import FNSERVE, free_port


def test_defaults_serve_the_embedded_models() -> None:
    settings = Settings()
    assert settings.default_model == "smollm2-135m-instruct"
    assert settings.default_embedding_model == "all-minilm-l6-v2"
    assert {m.id for m in settings.all_models} >= {
        "smollm2-135m-instruct",
        "gemma-3-270m",
        "all-minilm-l6-v2",
    }
    assert settings.preload == ["default"]


def test_environment_variables_use_the_fnserve_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FNSERVE_PORT", "9123")
    monkeypatch.setenv("FNSERVE_BACKEND", "cpu")
    monkeypatch.setenv("FNSERVE_DEFAULT_MODEL", "gemma-3-270m")
    settings = Settings()
    assert (settings.port, settings.backend, settings.default_model) == (9123, "cpu", "gemma-3-270m")


def test_a_toml_file_adds_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "fnserve.toml"
    config.write_text('port = 8100\npreload = []\n\n[[models]]\nid = "my-llama"\nsource = "/models/llama.gguf"\n')
    monkeypatch.setenv("FNSERVE_CONFIG", str(config))
    settings = Settings()
    assert settings.port == 8100
    assert settings.models[0].id == "my-llama"
    assert settings.models[0].source == "/models/llama.gguf"


def test_environment_beats_the_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "fnserve.toml"
    config.write_text("port = 8100\n")
    monkeypatch.setenv("FNSERVE_CONFIG", str(config))
    monkeypatch.setenv("FNSERVE_PORT", "8200")
    assert Settings().port == 8200


def test_a_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FNSERVE_CONFIG", "/nowhere/fnserve.toml")
    with pytest.raises(ValueError, match="/nowhere/fnserve.toml"):
        Settings()


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"port": 70000}, "port"),
        ({"backend": "tpu"}, "backend"),
        ({"default_model": "nope"}, "default_model='nope' is not a configured generate model"),
        ({"default_model": "all-minilm-l6-v2"}, "not a configured generate model"),
        ({"preload": ["ghost"]}, "preload names unknown models: ghost"),
        ({"models": [{"id": "gemma-3-270m", "source": "x"}]}, "configured twice: gemma-3-270m"),
        ({"models": [{"id": "default", "source": "x"}]}, "not 'default'"),
    ],
)
def test_impossible_settings_fail_with_a_readable_message(kwargs: dict, says: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**kwargs)
    assert says in str(err.value)


BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"max_n": 0}, "max_n"),
    ({"max_body_bytes": 10}, "max_body_bytes"),
    ({"rate_limit_requests": 0}, "rate_limit_requests"),
    ({"rate_limit_storage": "memcached://x"}, "rate_limit_storage"),
    ({"trusted_proxies": ["not-an-address"]}, "trusted_proxies"),
    ({"ssl_certfile": "/nowhere/cert.pem", "ssl_keyfile": "/nowhere/key.pem"}, "ssl_certfile='/nowhere/cert.pem'"),
    ({"api_keys_file": "/nowhere/keys.toml"}, "api_keys_file='/nowhere/keys.toml'"),
    ({"allowed_models": ["gemma-3-270m"]}, "not in allowed_models: smollm2-135m-instruct"),
    ({"allowed_models": ["ghost"]}, "allowed_models names unknown models: ghost"),
    ({"log_format": "xml"}, "log_format"),
    ({"drain_seconds": -1}, "drain_seconds"),
    ({"max_running": 0}, "max_running"),
    ({"colour": "blue"}, "colour"),
]


@pytest.mark.parametrize(("kwargs", "says"), BAD_CONFIGS, ids=[c[1][:30] for c in BAD_CONFIGS])
def test_bad_configs_stop_start_up_naming_the_key(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**kwargs)
    assert says in str(err.value)


def test_only_one_of_the_tls_files_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ValidationError, match="ssl_certfile and ssl_keyfile go together"):
        Settings(ssl_certfile=cert)


def test_an_unknown_key_in_the_toml_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "fnserve.toml"
    config.write_text("port = 8100\nmax_runing = 4\n")
    monkeypatch.setenv("FNSERVE_CONFIG", str(config))
    with pytest.raises(ValidationError, match="max_runing"):
        Settings()


def test_a_misspelt_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FNSERVE_URL", "FNSERVE_API_KEY", "FNSERVE_LT_MAX_TOKENS"):  # the client's and load tests'
        monkeypatch.setenv(name, "1")
    Settings()
    monkeypatch.setenv("FNSERVE_MAX_RUNING", "4")
    with pytest.raises(SettingsError, match="FNSERVE_MAX_RUNING"):
        Settings()


def test_the_example_config_is_valid_and_documents_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).parents[2] / "docs" / "fnserve.example.toml"
    text = example.read_text()
    for name in Settings.model_fields:
        assert re.search(rf"^#? ?{name} =", text, re.MULTILINE), f"{name} is not in fnserve.example.toml"
    monkeypatch.setenv("FNSERVE_CONFIG", str(example))
    Settings()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"FNSERVE_MAX_RUNING": "4"}, "FNSERVE_MAX_RUNING"),
        ({"FNSERVE_RATE_LIMIT_REQUESTS": "-5"}, "rate_limit_requests"),
    ],
)
def test_serve_stops_at_once_on_a_bad_config_naming_it(env: dict[str, str], says: str) -> None:
    done = subprocess.run(
        [str(FNSERVE), "serve", "--port", str(free_port())],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
