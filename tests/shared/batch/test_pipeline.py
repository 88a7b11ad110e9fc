"""The pipeline on local files: `fnserve batch-embed`, JSONL and Parquet, resumable, bounded in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shared.batch.pipeline import BadInputError, BatchOptions, embed_source
from shared.batch.storage import LocalSink, LocalSource
from shared.catalog import ModelCatalog
from tests.servers import FNSERVE


def batch_embed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FNSERVE), "batch-embed", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_the_command_embeds_a_folder_and_skips_what_is_done(tmp_path: Path, catalog: ModelCatalog) -> None:
    inputs = tmp_path / "in"
    (inputs / "sub dir").mkdir(parents=True)
    texts = ["A man is playing a guitar.", "Someone is strumming a guitar.", "Rates went up."]
    (inputs / "sub dir" / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    (inputs / "b.txt").write_text("one line\nanother line\n")
    first = batch_embed(str(inputs), str(tmp_path / "out"))
    assert first.returncode == 0, first.stderr
    assert "2 embedded (5 documents), 0 already done, 0 failed" in first.stderr
    (result,) = (tmp_path / "out" / "sub dir").glob("a.jsonl.*.embeddings.jsonl")
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["x0", "x1", "x2"]
    expected = catalog.embedding("default").embed(texts)
    assert np.allclose([r["embedding"] for r in rows], expected, atol=1e-5)
    again = batch_embed(str(inputs), str(tmp_path / "out"))
    assert "0 embedded (0 documents), 2 already done" in again.stderr  # resumable
    (inputs / "b.txt").write_text("one line\nanother line\na third\n")
    changed = batch_embed(str(inputs), str(tmp_path / "out"))
    assert "1 embedded (3 documents), 1 already done" in changed.stderr


def test_parquet_output_holds_the_same_vectors(tmp_path: Path, catalog: ModelCatalog) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": f"text {i}", "tag": i % 2}) + "\n" for i in range(10)))
    model = catalog.embedding("default")
    sink = LocalSink(tmp_path / "out")
    manifest = embed_source(
        LocalSource(source, "docs.jsonl"), sink, model, BatchOptions(output_format="parquet", batch_size=4)
    )
    assert manifest is not None and manifest.documents == 10
    table = pq.read_table(tmp_path / "out" / manifest.output)
    assert table.column("id").to_pylist() == [str(i) for i in range(10)]
    vectors = np.array(table.column("embedding").to_pylist())
    assert vectors.shape == (10, 384)
    assert np.allclose(vectors, model.embed([f"text {i}" for i in range(10)]), atol=1e-6)
    assert json.loads(table.column("metadata")[3].as_py()) == {"tag": 1}


def test_past_the_error_budget_a_file_fails_and_writes_nothing(tmp_path: Path, catalog: ModelCatalog) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{broken\n{broken\n')
    sink = LocalSink(tmp_path / "out")
    with pytest.raises(BadInputError, match="2 of 3 lines are bad"):
        embed_source(LocalSource(source, "bad.jsonl"), sink, catalog.embedding("default"), BatchOptions())
    assert not (tmp_path / "out").exists()


def test_running_out_of_time_stops_between_batches_and_writes_nothing(tmp_path: Path, catalog: ModelCatalog) -> None:
    source = tmp_path / "long.txt"
    source.write_text("".join(f"line {i}\n" for i in range(100)))
    calls: list[int] = []

    def out_of_time() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(TimeoutError):
        embed_source(
            LocalSource(source, "long.txt"),
            LocalSink(tmp_path / "out"),
            catalog.embedding("default"),
            BatchOptions(batch_size=10),
            out_of_time,
        )
    assert not (tmp_path / "out").exists()


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from shared.batch.pipeline import BatchOptions, embed_source
from shared.batch.storage import LocalSink, LocalSource
from shared.catalog import ModelCatalog
from shared.settings import Settings
model = ModelCatalog(Settings(preload=[])).embedding("default")
model.embed(["warm up"] * 64 + ["lorem ipsum " * 20000] * 8)  # the runtime's buffers for both lengths, first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
source = Path(sys.argv[1])
sink = LocalSink(Path(sys.argv[2]))
manifest = embed_source(LocalSource(source, source.name), sink, model, BatchOptions(batch_size=64))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"documents": manifest.documents, "growth_kib": after - before}))
"""


def test_a_file_larger_than_the_memory_bound_embeds_in_bounded_memory(tmp_path: Path) -> None:
    """A 60 MB input (short documents, and megabyte ones the model truncates) embedded with the peak resident
    memory growing by a fraction of the file's size: it streams in batches of 64, each text cut to what the model
    reads (a batch of the long documents whole would hold 60 MB)."""
    source = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 40_000  # ~1 MB a document
    with source.open("w") as f:
        for i in range(2000):
            f.write(json.dumps({"id": i, "text": f"short document {i}"}) + "\n")
        for i in range(60):
            f.write(json.dumps({"id": f"long{i}", "text": filler}) + "\n")
    size = source.stat().st_size
    assert size > 60e6
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(source), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["documents"] == 2060
    growth = result["growth_kib"] * 1024
    assert growth < size / 4, f"resident memory grew by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


def test_the_command_reads_and_writes_s3_urls(aws_env: dict[str, str], tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3")
    bucket = f"cli-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="in/a.txt", Body=b"alpha\nbeta\n")
    s3.put_object(Bucket=bucket, Key="in/b.jsonl", Body=b'{"id": "g", "text": "gamma"}\n')
    done = subprocess.run(
        [str(FNSERVE), "batch-embed", f"s3://{bucket}/in/", f"s3://{bucket}/out", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **aws_env, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "2 embedded (3 documents)" in done.stderr
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    assert len(keys) == 4 and all(k.startswith(("out/in/a.txt.", "out/in/b.jsonl.")) for k in keys)
