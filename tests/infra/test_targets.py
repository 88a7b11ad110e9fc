"""The Pulumi program: the stack's fnserve:target picks a module; the example stacks name real targets."""

from __future__ import annotations

import importlib
import runpy
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import targets
from tests.infra.stacks import run

INFRA = Path(__file__).parents[2] / "infra"


def test_every_target_is_a_module_with_build_and_every_example_stack_names_one() -> None:
    for module in targets.TARGETS.values():
        assert callable(importlib.import_module(f"infra.{module}").build)
    examples = sorted(INFRA.glob("Pulumi.*.yaml"))
    assert len(examples) == len(targets.TARGETS)
    for example in examples:
        config = yaml.safe_load(example.read_text())["config"]
        assert config["fnserve:target"] in targets.TARGETS, example.name
    project = yaml.safe_load((INFRA / "Pulumi.yaml").read_text())
    assert project["runtime"]["name"] == "python"


def test_an_unknown_target_is_named() -> None:
    with pytest.raises(ValueError, match="'aws-cpu' is not one of"):
        targets.build("aws-cpu", None)  # type: ignore[arg-type]


def test_the_program_builds_the_target_its_stack_names() -> None:
    def program(_: Any) -> dict[str, Any]:
        runpy.run_path(str(INFRA / "__main__.py"))  # as `pulumi up` runs it
        return {}

    recorder, _ = run(program, {"target": "k8s", "image": "registry.example.com/fnserve:1", "domain": "x.example"})
    assert recorder.of("kubernetes:apps/v1:Deployment")
