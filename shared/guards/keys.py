"""API keys: kept only as SHA-256 hashes, each with a name, an enabled flag and limits of its own.

Keys come from settings (plain, hashed as soon as they are read), from an AWS Secrets Manager secret (Lambda
has no other way to take a secret), and from a TOML keys file of `[[keys]]`
entries, which `fnserve keys create` appends to and which is read again when it changes (or on SIGHUP), so keys
rotate without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

KEY_PREFIX = "fns-"


class ApiKey(BaseModel):
    """One key's entry, as the keys file holds it (the key itself is never stored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    enabled: bool = True
    requests_per_minute: int | None = Field(default=None, ge=1, description="overrides rate_limit_requests")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="overrides rate_limit_tokens")


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)


class KeysFileError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys_file(path: Path) -> list[ApiKey]:
    try:
        data = tomllib.loads(path.read_text())
        keys = KeysFile.model_validate(data).keys
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise KeysFileError(f"keys file {str(path)!r} cannot be used: {exc}") from exc
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise KeysFileError(f"keys file {str(path)!r} names a key twice")
    return keys


def create_key(path: Path, name: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> str:
    """Append a new key's entry to the keys file (made, owner-only, if missing) and return the key itself."""
    existing = read_keys_file(path) if path.exists() else []
    if any(k.name == name for k in existing):
        raise KeysFileError(f"keys file {str(path)!r} already has a key named {name!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = ApiKey(
        name=name,
        sha256=hash_key(key),
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
    )
    lines = ["", "[[keys]]", f"name = {_toml_string(entry.name)}", f'sha256 = "{entry.sha256}"', "enabled = true"]
    lines += [
        f"{field} = {value}"
        for field in ("requests_per_minute", "tokens_per_minute")
        if (value := getattr(entry, field)) is not None
    ]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write("\n".join(lines) + "\n")
    read_keys_file(path)  # what was written reads back
    return key


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class _Snapshot:
    keys: tuple[ApiKey, ...]
    mtime: float | None


def _named(keys: list[str], prefix: str) -> tuple[ApiKey, ...]:
    return tuple(ApiKey(name=f"{prefix}-{i + 1}", sha256=hash_key(key)) for i, key in enumerate(keys))


class SecretKeys:
    """Keys kept in an AWS Secrets Manager secret as a JSON list: read at start, and again (at most once a
    minute) when a key nobody knows is presented, so a rotated secret takes effect without a restart."""

    REFRESH_SECONDS = 60.0

    def __init__(self, secret_id: str) -> None:
        try:
            import boto3
        except ImportError:
            raise KeysFileError(
                "api_keys_secret is set, but boto3 is not installed: pip install 'fnserve[aws]'"
            ) from None
        self.secret_id = secret_id
        self._client = boto3.client("secretsmanager")
        self.read_at = 0.0
        self.keys = self.read()

    def read(self) -> tuple[ApiKey, ...]:
        self.read_at = time.monotonic()
        try:
            value = self._client.get_secret_value(SecretId=self.secret_id)["SecretString"]
            keys = json.loads(value)
        except Exception as exc:  # botocore's errors, or a secret that is not JSON
            raise KeysFileError(f"the API keys secret {self.secret_id!r} cannot be read: {exc}") from exc
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise KeysFileError(f"the API keys secret {self.secret_id!r} must hold a JSON list of keys")
        return _named(keys, "secret")

    def stale(self) -> bool:
        return time.monotonic() - self.read_at > self.REFRESH_SECONDS


class KeyRing:
    """The keys a server accepts. Empty (no keys, no file, no secret) means authentication is off."""

    def __init__(self, plain: list[str], path: Path | None, secret: SecretKeys | None = None) -> None:
        self._plain = _named(plain, "key")
        self.path = path
        self.secret = secret
        self._lock = threading.Lock()
        self._snapshot = _Snapshot(self._plain + tuple(read_keys_file(path) if path else ()), self._mtime())

    @property
    def enabled(self) -> bool:
        return bool(self._plain) or self.path is not None or self.secret is not None

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns if self.path else None
        except OSError:
            return None

    def reload(self, force: bool = False) -> None:
        """Read the keys file again if it changed. A broken file keeps the keys already read, and says why."""
        if self.path is None:
            return
        mtime = self._mtime()
        if not force and mtime == self._snapshot.mtime:
            return
        with self._lock:
            try:
                keys = read_keys_file(self.path)
            except KeysFileError as exc:
                log.error("%s; keeping the %d keys read before", exc, len(self._snapshot.keys))
                self._snapshot = _Snapshot(self._snapshot.keys, mtime)
                return
            self._snapshot = _Snapshot(self._plain + tuple(keys), mtime)
            log.info("read %d keys from %s", len(keys), self.path)

    def lookup(self, presented: str) -> ApiKey | None:
        """The entry of the key presented, compared in constant time against every entry."""
        self.reload()
        digest = hash_key(presented)
        found = _find(self._snapshot.keys + (self.secret.keys if self.secret else ()), digest)
        if found is None and self.secret is not None and self.secret.stale():
            try:
                self.secret.keys = self.secret.read()
            except KeysFileError as exc:
                log.error("%s; keeping the keys read before", exc)
            found = _find(self.secret.keys, digest)
        return found


def _find(keys: tuple[ApiKey, ...], digest: str) -> ApiKey | None:
    found = None
    for entry in keys:
        if hmac.compare_digest(entry.sha256, digest):
            found = entry
    return found
