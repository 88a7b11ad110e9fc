"""k8s under Pulumi's mocks: pods ask for a GPU, probes on the real paths, a grace period that covers the
drain, an Ingress with TLS, an HPA and a PDB, the keys in a Secret."""

from __future__ import annotations

from typing import Any

import pytest

from infra import k8s
from tests.infra.stacks import Recorder, assert_secret_only_in, run

CONFIG = {
    "image": "registry.example.com/fnserve-cuda:0.1.0",
    "domain": "llm.example.com",
    "tlsSecret": "fnserve-tls",
    "minInstances": 2,
    "maxInstances": 5,
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
}


@pytest.fixture(scope="module")
def stack() -> tuple[Recorder, dict[str, Any]]:
    return run(k8s.build, CONFIG)


def pod_spec(recorder: Recorder) -> dict[str, Any]:
    spec: dict[str, Any] = recorder.one("kubernetes:apps/v1:Deployment").inputs["spec"]["template"]["spec"]
    return spec


def test_pods_ask_for_a_gpu_where_gpus_are(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    spec = pod_spec(recorder)
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_probes_and_grace_period_fit_the_drain(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    spec = pod_spec(recorder)
    (container,) = spec["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readiness"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert spec["terminationGracePeriodSeconds"] > int(env["FNSERVE_DRAIN_SECONDS"])


def test_ingress_serves_tls_and_keeps_streams_open(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, outputs = stack
    ingress = recorder.one("kubernetes:networking.k8s.io/v1:Ingress").inputs
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "fnserve-tls"}]
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert outputs["url"] == "https://llm.example.com"


def test_scaling_and_disruption(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    hpa = recorder.one("kubernetes:autoscaling/v2:HorizontalPodAutoscaler").inputs["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    pdb = recorder.one("kubernetes:policy/v1:PodDisruptionBudget").inputs["spec"]
    assert pdb["maxUnavailable"] == 1


def test_the_keys_live_in_a_secret(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    (container,) = pod_spec(recorder)["containers"]
    keys = next(e for e in container["env"] if e["name"] == "FNSERVE_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"]["key"] == "api-keys"
    assert_secret_only_in(recorder, {"kubernetes:core/v1:Secret"})


def test_an_image_and_a_domain_are_required() -> None:
    with pytest.raises(Exception, match="set `image`"):
        run(k8s.build, {"domain": "x.example"})
