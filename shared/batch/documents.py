"""Reading documents from a stream of bytes, a line at a time: JSONL objects or plain text lines.

Nothing is read whole: a file larger than memory is read in chunks. A line that cannot be a document (not
JSON, not an object, no text) is reported with its line number instead of failing the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["jsonl", "text"]
MAX_LINE_BYTES = 4 * 1024 * 1024  # a longer line is refused, so one line cannot take all the memory


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    line: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def guess_format(name: str) -> Format:
    return "jsonl" if name.lower().endswith((".jsonl", ".ndjson", ".jsonl.gz")) else "text"


def read_documents(
    lines: Iterable[bytes],
    fmt: Format,
    text_field: str = "text",
    id_field: str = "id",
    max_chars: int | None = None,
) -> Iterator[Document | BadLine]:
    """Each line's document, or why it is not one. Blank lines are skipped; ids default to the line number.

    Texts are cut to `max_chars`, the most the model reads: a batch of megabyte documents then holds no more
    than a batch of documents of the model's length.
    """
    for number, raw in enumerate(lines, start=1):
        if len(raw) > MAX_LINE_BYTES:
            yield BadLine(number, f"longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            yield BadLine(number, "not UTF-8")
            continue
        if not line:
            continue
        if fmt == "text":
            yield Document(str(number), line[:max_chars], number)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadLine(number, f"not JSON: {exc.msg}")
            continue
        if not isinstance(obj, dict):
            yield BadLine(number, "not a JSON object")
            continue
        text = obj.pop(text_field, None)
        if not isinstance(text, str) or not text.strip():
            yield BadLine(number, f"no text in field {text_field!r}")
            continue
        doc_id = obj.pop(id_field, number)
        yield Document(str(doc_id), text[:max_chars], number, obj)


def batched(items: Iterable[Document | BadLine], size: int) -> Iterator[tuple[list[Document], list[BadLine]]]:
    """Documents in groups of `size`, each with the bad lines met since the group before."""
    docs: list[Document] = []
    bad: list[BadLine] = []
    for item in items:
        if isinstance(item, BadLine):
            bad.append(item)
            continue
        docs.append(item)
        if len(docs) == size:
            yield docs, bad
            docs, bad = [], []
    if docs or bad:
        yield docs, bad
