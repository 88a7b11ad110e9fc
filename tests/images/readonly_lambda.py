"""Run Lambda entry points as the image does, failing on any write outside the writable places.

Lambda's file system is read-only outside /tmp. An audit hook refuses every write-mode open, directory made,
file moved or removed anywhere else, so a test sees such a write at once instead of in a deployed function.
Usage: python readonly_lambda.py WRITABLE_DIR  (events on stdin as JSON: [[module, event], ...]).
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace
from typing import Any

WRITABLE = tuple(os.path.realpath(p) for p in (sys.argv[1], "/dev"))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.replace", "os.symlink", "os.link", "os.truncate"}


def _writable(path: Any) -> bool:
    if isinstance(path, int):
        return True  # an open file descriptor: its opening was checked
    return os.path.realpath(os.fsdecode(path)).startswith(WRITABLE)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and path is not None and not _writable(path):
            raise PermissionError(f"read-only file system: a write to {path}")
    elif event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, str | bytes) and not _writable(path):
                raise PermissionError(f"read-only file system: {event} {os.fsdecode(path)}")


def main() -> None:
    sys.addaudithook(_hook)
    import importlib
    import logging

    logging.basicConfig()  # as Lambda's runtime (awslambdaric) gives the root logger a handler, level WARNING

    context = SimpleNamespace(aws_request_id="r", function_name="f", get_remaining_time_in_millis=lambda: 60000)
    results = []
    for module, event in json.load(sys.stdin):
        handler = importlib.import_module(module).handler
        results.append(handler(event, context))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
