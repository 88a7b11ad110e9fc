"""The Pulumi program: `pulumi up` in this folder builds the target the stack's config names."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `infra` as a package

import pulumi  # noqa: E402

from infra.config import StackConfig  # noqa: E402
from infra.targets import build  # noqa: E402

config = pulumi.Config()
for name, value in build(config.require("target"), StackConfig.read(config)).items():
    pulumi.export(name, value)
