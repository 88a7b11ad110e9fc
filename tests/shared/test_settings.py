from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.settings import Settings


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
