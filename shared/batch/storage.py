"""Where batch inputs come from and results go: local files and folders, or S3 objects and prefixes."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # bytes read at a time: an input larger than memory streams through


@dataclass(frozen=True)
class LocalSource:
    path: Path
    name: str  # relative to the folder given (or the file's own name)

    @property
    def version(self) -> str:
        stat = self.path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def lines(self) -> Iterator[bytes]:
        with self.path.open("rb", buffering=CHUNK) as f:
            yield from f


@dataclass(frozen=True)
class LocalSink:
    folder: Path

    def exists(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def put(self, name: str, path: Path) -> None:
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{hashlib.sha1(name.encode()).hexdigest()[:8]}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)  # a reader never sees half a file


@dataclass(frozen=True)
class S3Source:
    client: Any  # a boto3 S3 client
    bucket: str
    key: str
    etag: str
    version_id: str | None = None

    @property
    def name(self) -> str:
        return self.key

    @property
    def version(self) -> str:
        return self.version_id or self.etag.strip('"')

    def lines(self) -> Iterator[bytes]:
        extra = {"VersionId": self.version_id} if self.version_id else {}
        etag = '"' + self.etag.strip('"') + '"'  # notifications send it bare; If-Match wants it quoted
        body = self.client.get_object(Bucket=self.bucket, Key=self.key, IfMatch=etag, **extra)["Body"]
        try:
            yield from body.iter_lines(chunk_size=CHUNK, keepends=False)
        finally:
            body.close()


@dataclass(frozen=True)
class S3Sink:
    client: Any
    bucket: str
    prefix: str  # ends with "/" (or is empty)

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def put(self, name: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self.prefix + name)  # multipart past 8 MB


def local_sources(root: Path) -> list[LocalSource]:
    """A file, or every file under a folder (hidden ones and results left out), in a stable order."""
    if root.is_file():
        return [LocalSource(root, root.name)]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return [LocalSource(p, str(p.relative_to(root))) for p in files if ".embeddings." not in p.name]


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix)."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key
