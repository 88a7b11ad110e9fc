"""The stacks by target name; each module is imported only when its target is built."""

from __future__ import annotations

import importlib
from typing import Any

from infra.config import StackConfig

TARGETS = {
    "aws-gpu": "aws_gpu",
    "aws-functions": "aws_functions",
    "aws-batch-embed": "aws_batch_embed",
    "gcp-gpu": "gcp_gpu",
    "k8s": "k8s",
}


def build(target: str, config: StackConfig) -> dict[str, Any]:
    if target not in TARGETS:
        raise ValueError(f"fnserve:target {target!r} is not one of {', '.join(TARGETS)}")
    module = importlib.import_module(f"infra.{TARGETS[target]}")
    outputs: dict[str, Any] = module.build(config)
    return outputs
