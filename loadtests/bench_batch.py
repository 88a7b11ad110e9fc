"""Batch embedding throughput: documents/s of the pipeline against fastembed called directly.

    python -m loadtests.bench_batch [--documents 10000] [--rounds 3]

Three ways over the same short documents, alternated round by round (this machine's speed drifts):
fastembed's own `embed` in this process (the peer), `fnserve batch-embed`'s pipeline on a local JSONL file, and
the `batch_embed` Lambda handler on the same file as an S3 object behind an SQS message (moto in server mode:
a real HTTP endpoint on this machine). Model loading is outside every timing. Prints each median and its ratio
to the peer; writes the raw numbers as JSON beside the docs when --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = "guitar river bank rate music ocean theory model server stream token vector query answer".split()


def documents(n: int) -> list[dict[str, Any]]:
    """Short, varied, deterministic documents (8 to 20 words)."""
    return [
        {"id": f"doc-{i}", "text": " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 13))}
        for i in range(n)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="documents per pipeline batch")
    parser.add_argument("--out", help="write the raw figures here (JSON)")
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    from functions import batch_embed
    from shared.batch.pipeline import BatchOptions, embed_source
    from shared.batch.storage import LocalSink, LocalSource
    from shared.settings import get_settings

    docs = documents(args.documents)
    texts = [d["text"] for d in docs]
    work = Path(tempfile.mkdtemp(prefix="fnserve-bench-batch-"))
    source = work / "docs.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_DEFAULT_REGION="us-east-1",
        FNSERVE_PRELOAD="[]",
        FNSERVE_BATCH_SIZE=str(args.batch_size),
    )
    get_settings.cache_clear()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    model = batch_embed._catalog().embedding("default")
    model.embed(texts[:256])  # warm

    def peer() -> float:
        started = time.perf_counter()
        vectors = list(model._model.embed(texts, batch_size=64))  # fastembed itself, the same batch size
        assert len(vectors) == len(texts)
        return time.perf_counter() - started

    def local(round_: int) -> float:
        started = time.perf_counter()
        manifest = embed_source(
            LocalSource(source, f"docs-{round_}.jsonl"),
            LocalSink(work / "out"),
            model,
            BatchOptions(batch_size=args.batch_size),
        )
        assert manifest is not None and manifest.documents == len(texts)
        return time.perf_counter() - started

    def handler(round_: int) -> float:
        key = f"in/docs-{round_}.jsonl"
        s3.upload_file(str(source), "bench", key)
        etag = s3.head_object(Bucket="bench", Key=key)["ETag"].strip('"')
        body = {
            "Records": [
                {
                    "eventSource": "aws:s3",
                    "eventName": "ObjectCreated:Put",
                    "s3": {"bucket": {"name": "bench"}, "object": {"key": key, "eTag": etag}},
                }
            ]
        }
        event = {
            "Records": [
                {
                    "messageId": "m",
                    "receiptHandle": "r",
                    "body": json.dumps(body),
                    "attributes": {},
                    "messageAttributes": {},
                    "md5OfBody": "",
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                    "awsRegion": "us-east-1",
                }
            ]
        }
        context = type("Context", (), {"get_remaining_time_in_millis": staticmethod(lambda: 900_000)})()
        started = time.perf_counter()
        result = batch_embed.handler(event, context)
        assert result["batchItemFailures"] == [], result
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"fastembed": [], "local": [], "handler": []}
    for round_ in range(args.rounds):
        times["fastembed"].append(peer())
        times["local"].append(local(round_))
        times["handler"].append(handler(round_))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {len(texts) / v[-1]:.0f} docs/s" for k, v in times.items()))
    moto.stop()
    rates = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    print(f"\n{len(texts)} documents, batch {args.batch_size}, {args.rounds} rounds alternated, medians:")
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:8.0f} docs/s   {rate / rates['fastembed']:.2f}x fastembed in-process")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"documents": len(texts), "seconds": times, "docs_per_s": rates}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
