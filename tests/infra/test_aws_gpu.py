"""aws-gpu under Pulumi's mocks: HTTPS on 443 with the certificate, HTTP redirected, a GPU per task, health
checks on the readiness path, least-privilege IAM, no open port but 80/443 on the load balancer, the keys
only in Secrets Manager."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infra import aws_gpu
from tests.infra.stacks import Recorder, assert_no_wildcard_admin, assert_secret_only_in, run

CONFIG = {"domain": "llm.example.com", "zoneId": "ZONE1", "minInstances": 1, "maxInstances": 3}


@pytest.fixture(scope="module")
def stack() -> tuple[Recorder, dict[str, Any]]:
    return run(aws_gpu.build, CONFIG)


def test_https_on_443_with_the_validated_certificate_and_http_redirected(
    stack: tuple[Recorder, dict[str, Any]],
) -> None:
    recorder, outputs = stack
    listeners = {r.inputs["port"]: r.inputs for r in recorder.of("aws:lb/listener:Listener")}
    assert set(listeners) == {80, 443}
    https = listeners[443]
    assert https["protocol"] == "HTTPS" and https["sslPolicy"].startswith("ELBSecurityPolicy-TLS13")
    assert (
        https["certificateArn"]
        == recorder.one("aws:acm/certificateValidation:CertificateValidation").inputs["certificateArn"]
    )
    assert https["defaultActions"][0]["type"] == "forward"
    redirect = listeners[80]["defaultActions"][0]
    assert redirect["type"] == "redirect" and redirect["redirect"]["protocol"] == "HTTPS"
    assert redirect["redirect"]["port"] == "443"
    assert recorder.one("aws:acm/certificate:Certificate").inputs["validationMethod"] == "DNS"
    assert outputs["url"] == "https://llm.example.com"


def test_the_load_balancer_keeps_streams_open_and_is_the_only_way_in(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    alb = recorder.one("aws:lb/loadBalancer:LoadBalancer").inputs
    assert alb["idleTimeout"] >= 300  # SSE streams and long prefills
    groups = {r.name: r.inputs for r in recorder.of("aws:ec2/securityGroup:SecurityGroup")}
    for name, group in groups.items():
        for rule in group.get("ingress", []):
            if "0.0.0.0/0" in rule.get("cidrBlocks", []):
                assert name.endswith("-alb") and rule["fromPort"] in (80, 443) and rule["toPort"] == rule["fromPort"]
    instances = groups["fnserve-instances"]["ingress"]
    assert all("cidrBlocks" not in rule and rule["securityGroups"] for rule in instances)


def test_each_task_asks_for_a_gpu_and_is_health_checked_on_readiness(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    task = recorder.one("aws:ecs/taskDefinition:TaskDefinition").inputs
    (container,) = json.loads(task["containerDefinitions"])
    assert {"type": "GPU", "value": "1"} in container["resourceRequirements"]
    assert container["healthCheck"]["command"] == ["CMD", "fnserve", "probe"]  # GET /readiness, 200 or not
    assert container["stopTimeout"] >= 30
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env["FNSERVE_HOST"] == "0.0.0.0" and env["FNSERVE_DRAIN_SECONDS"] == "30"
    assert container["secrets"] == [{"name": "FNSERVE_API_KEYS", "valueFrom": "arn:aws:mock:::fnserve-api-keys"}]
    target_group = recorder.one("aws:lb/targetGroup:TargetGroup").inputs
    assert target_group["healthCheck"]["path"] == "/readiness"
    assert target_group["deregistrationDelay"] > 30  # longer than the drain


def test_gpu_capacity_scales_with_managed_termination_protection(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    template = recorder.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    assert template["imageId"] == "ami-0gpu"  # the AL2023 ECS GPU AMI from its SSM parameter
    group = recorder.one("aws:autoscaling/group:Group").inputs
    assert (group["minSize"], group["maxSize"], group["protectFromScaleIn"]) == (1, 3, True)
    provider = recorder.one("aws:ecs/capacityProvider:CapacityProvider").inputs["autoScalingGroupProvider"]
    assert provider["managedTerminationProtection"] == "ENABLED"
    assert provider["managedScaling"]["status"] == "ENABLED"
    policy = recorder.one("aws:appautoscaling/policy:Policy").inputs
    assert policy["policyType"] == "TargetTrackingScaling"
    assert recorder.one("aws:cloudwatch/logGroup:LogGroup").inputs["retentionInDays"] > 0


def test_iam_is_least_privilege_and_the_keys_stay_secret(stack: tuple[Recorder, dict[str, Any]]) -> None:
    recorder, _ = stack
    assert_no_wildcard_admin(recorder)
    assert_secret_only_in(recorder, {"aws:secretsmanager/secretVersion:SecretVersion"})


def test_https_needs_a_domain_or_a_certificate() -> None:
    with pytest.raises(Exception, match="serves HTTPS only"):
        run(aws_gpu.build, {"minInstances": 1})
