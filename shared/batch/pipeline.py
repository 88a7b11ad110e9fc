"""One input's documents -> embeddings -> an output file and a manifest, in bounded memory.

Where the input comes from (a local file, an S3 object) and where results go (a folder, an S3 prefix) are
`Source` and `Sink`; the Lambda function and `fnserve batch-embed` share everything else. The output's name is
derived from the input's name and version (an S3 ETag, a local file's size and mtime), so a redelivered input
finds its manifest and writes nothing, and a changed input writes a new result. The manifest is written last:
its presence means the result is whole.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np

from shared.batch.documents import BadLine, Document, Format, batched, guess_format, read_documents

OutputFormat = Literal["jsonl", "parquet"]
MANIFEST_SUFFIX = ".manifest.json"


class Embedder(Protocol):
    id: str
    dimensions: int
    max_chars: int  # the most of a text it reads

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


class Source(Protocol):
    @property
    def name(self) -> str:
        """The input's key or relative path."""

    @property
    def version(self) -> str:
        """What changes when its content does."""

    def lines(self) -> Iterator[bytes]: ...


class Sink(Protocol):
    def exists(self, name: str) -> bool: ...

    def put(self, name: str, path: Path) -> None: ...


@dataclass(frozen=True)
class BatchOptions:
    output_format: OutputFormat = "jsonl"
    input_format: Format | None = None  # None: by the input's name (.jsonl / .ndjson, else text)
    text_field: str = "text"
    id_field: str = "id"
    batch_size: int = 256  # documents embedded together: bounds the memory a batch takes
    error_budget: float = 0.05  # the share of bad lines a file may have and still complete
    model: str = "default"


class BadInputError(ValueError):
    """An input with more bad lines than the error budget allows: it fails whole, to be retried or set aside."""


@dataclass
class Manifest:
    source: str
    source_version: str
    output: str
    model: str
    dimensions: int
    format: str
    documents: int = 0
    bad_lines: int = 0
    bad_line_numbers: list[int] = field(default_factory=list)  # the first few
    bad_line_reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    documents_per_second: float = 0.0


def output_name(source: Source, fmt: OutputFormat) -> str:
    """`<input name>.<version digest>.embeddings.<format>`: the same input version, the same name."""
    digest = hashlib.sha256(source.version.encode()).hexdigest()[:16]
    return f"{source.name}.{digest}.embeddings.{fmt}"


def embed_source(
    source: Source,
    sink: Sink,
    model: Embedder,
    options: BatchOptions,
    out_of_time: Callable[[], bool] | None = None,
) -> Manifest | None:
    """Embed every document of the input; None when its result already exists (nothing is written then).

    Raises BadInputError past the error budget, TimeoutError when `out_of_time` says so between batches.
    """
    out = output_name(source, options.output_format)
    if sink.exists(out + MANIFEST_SUFFIX):
        return None
    started = time.perf_counter()
    fmt = options.input_format or guess_format(source.name)
    manifest = Manifest(source.name, source.version, out, model.id, model.dimensions, options.output_format)
    docs = read_documents(source.lines(), fmt, options.text_field, options.id_field, model.max_chars)
    with tempfile.TemporaryDirectory(prefix="fnserve-batch-") as scratch:
        path = Path(scratch) / "out"
        writer = _writer(options.output_format, path, model.dimensions)
        try:
            for group, bad in batched(docs, options.batch_size):
                if out_of_time is not None and out_of_time():
                    raise TimeoutError(f"out of time embedding {source.name}; it will be retried")
                _note_bad(manifest, bad)
                if group:
                    writer.write(group, model.embed([d.text for d in group], batch_size=min(64, len(group))))
                    manifest.documents += len(group)
        finally:
            writer.close()
        lines = manifest.documents + manifest.bad_lines
        if manifest.bad_lines and manifest.bad_lines > options.error_budget * lines:
            raise BadInputError(
                f"{source.name}: {manifest.bad_lines} of {lines} lines are bad (first: line "
                f"{manifest.bad_line_numbers[0]}, {manifest.bad_line_reasons[0]}); the budget is "
                f"{options.error_budget:.0%}"
            )
        sink.put(out, path)
        manifest.seconds = round(time.perf_counter() - started, 3)
        manifest.documents_per_second = round(manifest.documents / manifest.seconds, 1) if manifest.seconds else 0.0
        manifest_path = Path(scratch) / "manifest.json"
        manifest_path.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
        sink.put(out + MANIFEST_SUFFIX, manifest_path)  # last: its presence means the result is whole
    return manifest


def _note_bad(manifest: Manifest, bad: list[BadLine]) -> None:
    manifest.bad_lines += len(bad)
    for line in bad:
        if len(manifest.bad_line_numbers) < 10:
            manifest.bad_line_numbers.append(line.line)
            manifest.bad_line_reasons.append(line.reason)


class _Writer(Protocol):
    def write(self, docs: list[Document], vectors: np.ndarray) -> None: ...

    def close(self) -> None: ...


def _writer(fmt: OutputFormat, path: Path, dimensions: int) -> _Writer:
    return _ParquetWriter(path, dimensions) if fmt == "parquet" else _JsonlWriter(path)


class _JsonlWriter:
    """One `{"id", "embedding", "line", ...metadata}` object a line."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8")

    def write(self, docs: list[Document], vectors: np.ndarray) -> None:
        # Rounded to 7 decimals (float32's precision) in one numpy call: per-element rounding in Python was
        # 10 % of the pipeline's time.
        rows = np.round(np.asarray(vectors, dtype=np.float64), 7).tolist()
        for doc, embedding in zip(docs, rows, strict=True):
            row: dict[str, Any] = {**doc.metadata, "id": doc.id, "line": doc.line, "embedding": embedding}
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.close()


class _ParquetWriter:
    """Columns id, line, embedding (fixed-size float32 lists), metadata (JSON); a row group per batch."""

    def __init__(self, path: Path, dimensions: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self._schema = pa.schema(
            [
                ("id", pa.string()),
                ("line", pa.int64()),
                ("embedding", pa.list_(pa.float32(), dimensions)),
                ("metadata", pa.string()),
            ]
        )
        self._writer = pq.ParquetWriter(str(path), self._schema)

    def write(self, docs: list[Document], vectors: np.ndarray) -> None:
        pa = self._pa
        flat = pa.array(np.asarray(vectors, dtype=np.float32).reshape(-1))
        table = pa.table(
            {
                "id": [d.id for d in docs],
                "line": [d.line for d in docs],
                "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
                "metadata": [json.dumps(d.metadata, ensure_ascii=False) for d in docs],
            },
            schema=self._schema,
        )
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
