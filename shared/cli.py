"""The `fnserve` command: serve the API, prepare model caches, or talk to a running server."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from shared.errors import FnserveError
from shared.guards.keys import KeysFileError
from shared.settings import Settings, SettingsError

if TYPE_CHECKING:
    from shared.backends.targets import Target

# Each function's models, loaded before readiness when FNSERVE_PRELOAD is not set: a function loads only what
# it serves (the models function loads none, and imports no framework).
FUNCTION_PRELOAD = {
    "chat": ["default"],
    "completions": ["default"],
    "embeddings": ["default-embedding"],
    "models": [],
    "sessions": [],
}
FUNCTIONS = tuple(FUNCTION_PRELOAD)


def _serve(args: argparse.Namespace) -> int:
    from shared.logs import configure_logging
    from shared.server import serve

    flags = (
        ("host", args.host),
        ("port", args.port),
        ("ssl_certfile", args.ssl_certfile),
        ("ssl_keyfile", args.ssl_keyfile),
    )
    settings = Settings(**{k: v for k, v in flags if v is not None})
    if args.function and "preload" not in settings.model_fields_set:
        settings = settings.model_copy(update={"preload": FUNCTION_PRELOAD[args.function]})
    configure_logging(settings)
    if args.function:  # one function alone, as a streaming Lambda behind the web adapter serves it
        from shared.asgi import create_app

        module = importlib.import_module(f"functions.{args.function}")
        app = create_app(module.router, settings=settings, title=f"fnserve {args.function}")
    else:
        from functions.app import build

        app = build(settings)
    if args.function in (None, "chat", "completions"):
        app.state.catalog.backend  # noqa: B018 - a named backend that cannot run fails here, at start-up
    serve(settings, app)
    return 0


def _probe(args: argparse.Namespace) -> int:
    """Exit 0 when the local server's probe path answers 200: a container's HEALTHCHECK, without curl."""
    import ssl
    import urllib.request

    settings = Settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    scheme = "https" if settings.ssl_certfile else "http"
    context = ssl._create_unverified_context() if settings.ssl_certfile else None  # our own certificate, locally
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{settings.port}{args.path}", timeout=4, context=context) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"fnserve probe: {args.path}: {exc}", file=sys.stderr)
        return 1


def _batch_embed(args: argparse.Namespace) -> int:
    """Embed every document of a file or folder (or s3:// prefix) into OUTPUT, skipping inputs already done."""
    from tqdm import tqdm

    from shared.batch.pipeline import BadInputError, BatchOptions, embed_source
    from shared.batch.storage import LocalSink, S3Sink, S3Source, local_sources, split_s3_url
    from shared.catalog import ModelCatalog

    settings = Settings()
    model = ModelCatalog(settings).embedding(args.model or settings.batch_model)
    options = BatchOptions(
        output_format=args.format or settings.batch_output_format,
        text_field=args.text_field or settings.batch_text_field,
        batch_size=args.batch_size or settings.batch_size,
        error_budget=settings.batch_error_budget,
    )
    sources: list[Any]
    if args.input.startswith("s3://"):
        import boto3

        s3 = boto3.client("s3")
        bucket, prefix = split_s3_url(args.input)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        sources = [S3Source(s3, bucket, o["Key"], o["ETag"]) for page in pages for o in page.get("Contents", [])]
    else:
        root = Path(args.input)
        if not root.exists():
            print(f"fnserve batch-embed: {root} does not exist", file=sys.stderr)
            return 2
        sources = local_sources(root)
    sink: Any
    if args.output.startswith("s3://"):
        import boto3

        bucket, prefix = split_s3_url(args.output)
        sink = S3Sink(boto3.client("s3"), bucket, prefix.rstrip("/") + "/" if prefix else "")
    else:
        sink = LocalSink(Path(args.output))
    done = skipped = failed = documents = 0
    with tqdm(sources, unit="file", disable=args.quiet) as progress:
        for source in progress:
            progress.set_postfix_str(source.name[-40:])
            try:
                manifest = embed_source(source, sink, model, options)
            except BadInputError as exc:
                failed += 1
                tqdm.write(f"failed: {exc}", file=sys.stderr)
                continue
            if manifest is None:
                skipped += 1
            else:
                done += 1
                documents += manifest.documents
    print(f"{done} embedded ({documents} documents), {skipped} already done, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _keys(args: argparse.Namespace) -> int:
    from shared.guards.keys import create_key

    key = create_key(Path(args.file), args.name, args.requests_per_minute, args.tokens_per_minute)
    print(key)
    print(f"(key {args.name!r} added to {args.file}; it is shown only this once)", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from shared.sources import resolve_embedding_model, resolve_generation_model

    settings = Settings()
    logging.basicConfig(level="INFO", format="%(message)s")
    if args.kernels_for and (problem := _kernels_for_problem(settings)):
        print(f"fnserve prepare: --kernels-for: {problem}", file=sys.stderr)
        return 2
    wanted = args.models or [m.id for m in settings.all_models if m.source.startswith("embedded:")]
    for config in settings.all_models:
        if config.id in wanted:
            resolve = resolve_embedding_model if config.kind == "embedding" else resolve_generation_model
            path = resolve(config, settings.cache_dir)
            print(f"{config.id}: {path}")
            if config.kind != "embedding" and settings.backend in ("auto", "cpu"):
                _pack(settings, path)
    if args.kernels_for:
        return _compile_kernels_for(settings, args.kernels_for)
    return 0


def _kernels_for_problem(settings: Settings) -> str | None:
    """Why kernels cannot be compiled for more CPUs here: they go beside the baseline's, where starts seek them."""
    from shared.backends.targets import KERNELS_DIR

    folder = settings.cache_dir / KERNELS_DIR
    if not os.environ.get("NUMBA_CPU_NAME"):
        return "needs NUMBA_CPU_NAME, the CPU every host runs (the image's x86-64-v3)"
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if not cache or Path(cache).resolve() != folder.resolve():
        return f"needs NUMBA_CACHE_DIR={folder}, where starts find prebuilt kernels"
    if settings.backend not in ("auto", "cpu"):
        return f"the kernels are the CPU backend's, not {settings.backend}'s"
    return None


def _compile_kernels_for(settings: Settings, targets: list[Target]) -> int:
    """Compile the kernels this process compiled (or found) for its own CPU (NUMBA_CPU_NAME) for each target
    too, in a process whose numba compiles for it, without running them; then list them for the starts' choice
    (shared.backends.targets)."""
    import pickle
    import subprocess

    from shared.backends.kernels.cache import compiled_signatures
    from shared.backends.targets import KERNELS_DIR, Target, write_manifest

    compiled = compiled_signatures()
    if not compiled:
        print("fnserve prepare: --kernels-for: no model here runs numba's kernels", file=sys.stderr)
        return 2
    entries = pickle.dumps(compiled)
    step = "from shared.backends.kernels.cache import compile_pickled; compile_pickled()"
    for target in targets:
        env = os.environ | target.environment()
        if subprocess.run([sys.executable, "-c", step], input=entries, env=env).returncode:
            print(f"fnserve prepare: --kernels-for: compiling for {target.name} failed (above)", file=sys.stderr)
            return 1
        print(f"kernels compiled for {target.name}")
    baseline = Target.from_environment()
    assert baseline is not None  # _kernels_for_problem
    write_manifest(settings.cache_dir / KERNELS_DIR, baseline, targets)
    return 0


def _target(name: str) -> Target:
    from shared.backends.targets import Target, TargetError

    try:
        return Target.parse(name)
    except TargetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pack(settings: Settings, model_dir: Path) -> None:
    """Load a generation model once on the CPU backend, as a start would: its weights are packed for the kernels
    and kept in the cache (shared.backends.packed.PackedWeights), so an image's starts map them."""
    from shared.backends import select_backend
    from shared.backends.llama_config import LlamaConfig

    if LlamaConfig.from_dir(model_dir) is None:
        return  # served by transformers' own model: nothing to pack
    backend = select_backend(settings, prebuilt_kernels=False)  # compiled for the environment's CPU
    if backend.name == "cpu":
        backend.load(model_dir)


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    key = os.environ.get("FNSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "unused"
    return OpenAI(base_url=args.url, api_key=key)


def _chat(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.list_models:
        for model in client.models.list():
            print(f"{model.id}\t{getattr(model, 'kind', '')}")
        return 0
    sampling: dict[str, Any] = {}
    if args.max_tokens:
        sampling["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if not args.prompt:
        if not sys.stdin.isatty():
            print("fnserve chat: give a prompt, or --list-models (or run it in a terminal)", file=sys.stderr)
            return 2
        from shared.repl import Repl

        return Repl(client, args.model, args.system, sampling, args.session).run()
    messages = [{"role": "user", "content": args.prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    options: dict[str, Any] = {"model": args.model, "messages": messages, **sampling}
    if args.session:
        options["extra_body"] = {"session_id": args.session}
    if args.json_schema:
        options["response_format"] = _json_schema_format(Path(args.json_schema))
    if args.stream:
        for chunk in client.chat.completions.create(**options, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    else:
        print(client.chat.completions.create(**options).choices[0].message.content)
    return 0


def _json_schema_format(path: Path) -> dict[str, Any]:
    """response_format for a JSON Schema file: the reply is JSON that validates against it."""
    try:
        schema = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"fnserve chat: --json-schema {path}: {exc}") from None
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _embed(args: argparse.Namespace) -> int:
    result = _client(args).embeddings.create(model=args.model, input=args.texts)
    for item in result.data:
        print(json.dumps(item.embedding))
    return 0


def _passthrough(command: str, argv: list[str]) -> int:
    """`fnserve loadtest ...` and `fnserve bench ...` hand their arguments to the loadtests scripts."""
    if command == "loadtest":
        from loadtests.run import main as run
    else:
        from loadtests.bench_single import main as run
    return run(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnserve", description="Serve language models behind the OpenAI API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server (all functions in one process)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, or FNSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, or FNSERVE_PORT)")
    serve.add_argument(
        "--function", choices=FUNCTIONS, help="serve this function alone (default: all of them, and the aliases)"
    )
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM): serve HTTPS (or FNSERVE_SSL_CERTFILE)")
    serve.add_argument("--ssl-keyfile", help="its private key (PEM) (or FNSERVE_SSL_KEYFILE)")
    serve.set_defaults(run=_serve)
    batch = commands.add_parser("batch-embed", help="embed every document of files into an output folder")
    batch.add_argument("input", help="a .jsonl or text file, a folder of them, or s3://bucket/prefix")
    batch.add_argument("output", help="a folder, or s3://bucket/prefix; inputs whose results are there are skipped")
    batch.add_argument("--format", choices=("jsonl", "parquet"), help="output format (default jsonl)")
    batch.add_argument("--text-field", help="the text's field in JSONL inputs (default text)")
    batch.add_argument("--batch-size", type=int, help="documents embedded together (default 256)")
    batch.add_argument("--model", help="embedding model (default: the default embedding model)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.set_defaults(run=_batch_embed)
    probe = commands.add_parser("probe", help="exit 0 when the local server is ready (a container HEALTHCHECK)")
    probe.add_argument("--path", default="/readiness", help="the probe path (default %(default)s; /health: alive)")
    probe.set_defaults(run=_probe)
    keys = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="make a key, append its hash to a keys file, print the key")
    create.add_argument("name", help="a name for the key (it appears in logs, never the key)")
    create.add_argument("--file", required=True, help="the keys file (FNSERVE_API_KEYS_FILE of the server)")
    create.add_argument("--requests-per-minute", type=int, help="this key's own request limit")
    create.add_argument("--tokens-per-minute", type=int, help="this key's own token limit")
    create.set_defaults(run=_keys)
    prepare = commands.add_parser("prepare", help="convert and cache model weights now, not on first use")
    prepare.add_argument("models", nargs="*", help="model ids (default: the embedded models)")
    prepare.add_argument(
        "--kernels-for",
        action="append",
        type=_target,
        default=[],
        metavar="TARGET",
        help="also compile numba's kernels for this CPU (an x86-64 level and +features, e.g."
        " x86-64-v4+avx512vnni), best first; each start takes the first its CPU runs",
    )
    prepare.set_defaults(run=_prepare)

    url = os.environ.get("FNSERVE_URL", "http://127.0.0.1:8000/v1")
    chat = commands.add_parser("chat", help="ask a running server (the official openai client)")
    chat.add_argument("prompt", nargs="?", help="one question; none: an interactive conversation (/help there)")
    chat.add_argument("--session", metavar="ID", help="continue a stored session (/v1/sessions)")
    chat.add_argument("--model", default="default")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--stream", action="store_true", help="print tokens as they come")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--json-schema", metavar="FILE", help="reply with JSON that validates against this schema")
    chat.add_argument("--list-models", action="store_true", help="list the server's models instead")
    chat.add_argument("--url", default=url, help="API base URL (FNSERVE_URL; default %(default)s)")
    chat.set_defaults(run=_chat)
    embed = commands.add_parser("embed", help="embed texts with a running server; one JSON vector a line")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--model", default="default")
    embed.add_argument("--url", default=url, help="API base URL (FNSERVE_URL; default %(default)s)")
    embed.set_defaults(run=_embed)
    commands.add_parser("loadtest", help="run a Locust scenario against a server (fnserve loadtest --help)")
    commands.add_parser("bench", help="one stream and cold start, against llama-server if found (fnserve bench --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("loadtest", "bench"):
        return _passthrough(argv[0], argv[1:])
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ValidationError as exc:
        print(f"fnserve: invalid settings:\n{exc}", file=sys.stderr)
    except SettingsError as exc:
        print(f"fnserve: invalid settings: {exc}", file=sys.stderr)
    except FnserveError as exc:
        print(f"fnserve: {exc.message}", file=sys.stderr)
    except KeysFileError as exc:
        print(f"fnserve: {exc}", file=sys.stderr)
    except Exception as exc:
        if type(exc).__module__.startswith("openai"):  # the server's answer, or no server at all
            print(f"fnserve: {exc}", file=sys.stderr)
            return 1
        raise
    return 2


if __name__ == "__main__":
    sys.exit(main())
