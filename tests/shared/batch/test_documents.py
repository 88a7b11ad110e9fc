"""Documents from JSONL or text lines: ids, metadata, bad lines reported with their numbers, batches."""

from __future__ import annotations

from shared.batch.documents import BadLine, Document, batched, guess_format, read_documents


def test_jsonl_lines_become_documents_and_bad_lines_are_reported() -> None:
    lines = [
        b'{"id": "a", "text": "first", "lang": "en"}',
        b"",
        b"{not json",
        b'["a list"]',
        b'{"id": "d", "body": "no text field"}',
        b'{"text": "no id"}',
        b"\xff\xfe",
    ]
    items = list(read_documents(lines, "jsonl"))
    assert items[0] == Document("a", "first", 1, {"lang": "en"})
    assert [(b.line, b.reason.split(":")[0]) for b in items if isinstance(b, BadLine)] == [
        (3, "not JSON"),
        (4, "not a JSON object"),
        (5, "no text in field 'text'"),
        (7, "not UTF-8"),
    ]
    assert Document("6", "no id", 6) in items  # the line number stands in for a missing id


def test_a_configured_text_field_and_plain_text_lines() -> None:
    (doc,) = read_documents([b'{"id": 1, "body": "hello"}'], "jsonl", text_field="body")
    assert doc == Document("1", "hello", 1)
    assert [d.text for d in read_documents([b"one\n", b"  \n", b"two"], "text")] == ["one", "two"]  # type: ignore[union-attr]
    assert guess_format("x/y.JSONL") == "jsonl" and guess_format("notes.txt") == "text"


def test_texts_are_cut_to_what_the_model_reads() -> None:
    lines = [b'{"id": "a", "text": "abcdefgh"}', b"plain text line"]
    assert [d.text for d in read_documents(lines[:1], "jsonl", max_chars=5)] == ["abcde"]  # type: ignore[union-attr]
    assert [d.text for d in read_documents(lines[1:], "text", max_chars=5)] == ["plain"]  # type: ignore[union-attr]
    assert [d.text for d in read_documents(lines[:1], "jsonl")] == ["abcdefgh"]  # type: ignore[union-attr]


def test_batches_carry_the_bad_lines_met_on_the_way() -> None:
    items = [Document(str(i), "t", i) for i in range(5)]
    bad = BadLine(9, "x")
    groups = list(batched([*items[:2], bad, *items[2:]], 2))
    assert [(len(docs), len(bads)) for docs, bads in groups] == [(2, 0), (2, 1), (1, 0)]
