"""The `fnserve` command: serve the API, or prepare model caches ahead of time."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from shared.errors import FnserveError
from shared.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from functions.app import build

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build(settings)
    app.state.catalog.backend  # noqa: B018 - a named backend that cannot run fails here, at start-up
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from shared.sources import resolve_embedding_model, resolve_generation_model

    settings = Settings()
    logging.basicConfig(level="INFO", format="%(message)s")
    wanted = args.models or [m.id for m in settings.all_models if m.source.startswith("embedded:")]
    for config in settings.all_models:
        if config.id in wanted:
            resolve = resolve_embedding_model if config.kind == "embedding" else resolve_generation_model
            print(f"{config.id}: {resolve(config, settings.cache_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnserve", description="Serve language models behind the OpenAI API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server (all functions in one process)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, or FNSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, or FNSERVE_PORT)")
    serve.set_defaults(run=_serve)
    prepare = commands.add_parser("prepare", help="convert and cache model weights now, not on first use")
    prepare.add_argument("models", nargs="*", help="model ids (default: the embedded models)")
    prepare.set_defaults(run=_prepare)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ValidationError as exc:
        print(f"fnserve: invalid settings:\n{exc}", file=sys.stderr)
    except FnserveError as exc:
        print(f"fnserve: {exc.message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
