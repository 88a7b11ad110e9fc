"""gcp-gpu under Pulumi's mocks: an L4 with at least 4 CPU and 16 GiB, no CPU throttling, probes on the real
paths, the keys from Secret Manager, public or IAM-only invokers."""

from __future__ import annotations

from typing import Any

import pytest

from infra import gcp_gpu
from tests.infra.stacks import Recorder, assert_secret_only_in, run

SERVICE = "gcp:cloudrunv2/service:Service"


@pytest.fixture(scope="module")
def stack() -> tuple[Recorder, dict[str, Any]]:
    return run(gcp_gpu.build, {"region": "us-central1", "minInstances": 0, "maxInstances": 3})


def test_cloud_run_gets_an_l4_with_enough_cpu_and_memory(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, outputs = stack
    template = recorder.one(SERVICE).inputs["template"]
    (container,) = template["containers"]
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and float(limits["cpu"]) >= 4
    assert limits["memory"].endswith("Gi") and int(limits["memory"][:-2]) >= 16
    assert container["resources"]["cpuIdle"] is False  # no throttling between requests
    assert template["nodeSelector"]["accelerator"] == "nvidia-l4"
    assert template["scaling"] == {"minInstanceCount": 0, "maxInstanceCount": 3}
    assert outputs["url"].startswith("https://")


def test_probes_hit_the_real_health_paths(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    (container,) = recorder.one(SERVICE).inputs["template"]["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_the_keys_come_from_secret_manager(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    (container,) = recorder.one(SERVICE).inputs["template"]["containers"]
    keys = next(e for e in container["envs"] if e["name"] == "FNSERVE_API_KEYS")
    assert keys["valueSource"]["secretKeyRef"]["version"] == "latest" and "value" not in keys
    assert_secret_only_in(recorder, {"gcp:secretmanager/secretVersion:SecretVersion"})
    accessor = recorder.one("gcp:secretmanager/secretIamMember:SecretIamMember").inputs
    assert accessor["role"] == "roles/secretmanager.secretAccessor" and accessor["member"].startswith("serviceAccount:")


def test_invokers_are_public_or_iam_only() -> None:
    public, _ = run(gcp_gpu.build, {})
    assert [m.inputs["member"] for m in public.of("gcp:cloudrunv2/serviceIamMember:ServiceIamMember")] == ["allUsers"]
    private, _ = run(gcp_gpu.build, {"public": False, "invokers": ["user:ops@example.com"]})
    members = [m.inputs["member"] for m in private.of("gcp:cloudrunv2/serviceIamMember:ServiceIamMember")]
    assert members == ["user:ops@example.com"]
