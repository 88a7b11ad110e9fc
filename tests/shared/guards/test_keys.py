"""Keys from an AWS Secrets Manager secret (moto in server mode), as a Lambda function reads them."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import httpx
import pytest

from shared.guards.keys import KeyRing, KeysFileError, SecretKeys
from tests.servers import running_server


def put_secret(name: str, value: str) -> None:
    client = boto3.client("secretsmanager")
    try:
        client.create_secret(Name=name, SecretString=value)
    except client.exceptions.ResourceExistsException:
        client.put_secret_value(SecretId=name, SecretString=value)


def test_a_rotated_secret_takes_effect_without_a_restart(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    put_secret("fnserve/rotating", json.dumps(["fns-old"]))
    ring = KeyRing([], None, SecretKeys("fnserve/rotating"))
    assert ring.enabled and ring.lookup("fns-old") is not None and ring.lookup("fns-new") is None
    put_secret("fnserve/rotating", json.dumps(["fns-new"]))
    assert ring.lookup("fns-new") is None  # read at most once a minute ...
    monkeypatch.setattr(SecretKeys, "REFRESH_SECONDS", 0.0)
    found = ring.lookup("fns-new")  # ... then again when an unknown key comes
    assert found is not None and found.name == "secret-1"
    assert ring.lookup("fns-old") is None


def test_a_secret_that_is_not_a_list_of_keys_is_refused(aws_env: dict[str, str]) -> None:
    put_secret("fnserve/broken", '{"key": "x"}')
    with pytest.raises(KeysFileError, match="JSON list"):
        SecretKeys("fnserve/broken")
    with pytest.raises(KeysFileError, match="cannot be read"):
        SecretKeys("fnserve/missing")


def test_a_server_takes_its_keys_from_the_secret(aws_env: dict[str, str], tmp_path: Path) -> None:
    put_secret("fnserve/server", json.dumps(["fns-from-the-secret"]))
    env = {**aws_env, "FNSERVE_PRELOAD": "[]", "FNSERVE_API_KEYS_SECRET": "fnserve/server"}
    with running_server(tmp_path / "fnserve.log", env) as server:
        ok = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer fns-from-the-secret"}, timeout=30)
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
