"""API keys: kept only as SHA-256 hashes, each with a name, an enabled flag and limits of its own.

Keys come from settings (plain, hashed as soon as they are read) and from a TOML keys file of `[[keys]]`
entries, which `fnserve keys create` appends to and which is read again when it changes (or on SIGHUP), so keys
rotate without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
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


class KeyRing:
    """The keys a server accepts. Empty (no keys, no file) means authentication is off."""

    def __init__(self, plain: list[str], path: Path | None) -> None:
        self._plain = tuple(ApiKey(name=f"key-{i + 1}", sha256=hash_key(key)) for i, key in enumerate(plain))
        self.path = path
        self._lock = threading.Lock()
        self._snapshot = _Snapshot(self._plain + tuple(read_keys_file(path) if path else ()), self._mtime())

    @property
    def enabled(self) -> bool:
        return bool(self._plain) or self.path is not None

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
        found = None
        for entry in self._snapshot.keys:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found
