"""gcp-gpu: fnserve on Cloud Run with an NVIDIA L4, from an Artifact Registry repository.

4 CPU and 16 GiB with the GPU (Cloud Run's minimum for an L4), CPU always allocated (no throttling between
requests: the engine's thread works while streams are open), a startup probe on the readiness path and a
liveness probe on the health path, min/max instances and request concurrency from config, the API keys from
Secret Manager, and a public or IAM-only invoker.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_gcp as gcp

from infra.config import HEALTH_PATH, PORT, READY_PATH, StackConfig


def build(cfg: StackConfig) -> dict[str, Any]:
    name = cfg.name
    region = cfg.region or "us-central1"
    repository = gcp.artifactregistry.Repository(
        f"{name}-images", repository_id=name, location=region, format="DOCKER", description="fnserve images"
    )
    image = cfg.image or pulumi.Output.concat(
        region, "-docker.pkg.dev/", repository.project, "/", repository.repository_id, "/fnserve-cuda:", cfg.image_tag
    )
    account = gcp.serviceaccount.Account(f"{name}-run", account_id=f"{name}-run", display_name="fnserve on Cloud Run")
    secret = gcp.secretmanager.Secret(f"{name}-api-keys", secret_id=f"{name}-api-keys", replication={"auto": {}})
    if cfg.api_keys is not None:
        gcp.secretmanager.SecretVersion(f"{name}-api-keys", secret=secret.id, secret_data=cfg.api_keys)
    access = gcp.secretmanager.SecretIamMember(
        f"{name}-api-keys",
        secret_id=secret.id,
        role="roles/secretmanager.secretAccessor",
        member=pulumi.Output.concat("serviceAccount:", account.email),
    )
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in cfg.environment().items()]
    env.append(
        {
            "name": "FNSERVE_API_KEYS",
            "value_source": {"secret_key_ref": {"secret": secret.secret_id, "version": "latest"}},
        }
    )
    service = gcp.cloudrunv2.Service(
        f"{name}-gpu",
        name=name,
        location=region,
        ingress="INGRESS_TRAFFIC_ALL",
        deletion_protection=False,
        template={
            "service_account": account.email,
            "scaling": {"min_instance_count": cfg.min_instances, "max_instance_count": cfg.max_instances},
            "max_instance_request_concurrency": int(cfg.get("concurrency", 32)),
            "timeout": "3600s",  # long streams
            "node_selector": {"accelerator": cfg.get("gpuType", "nvidia-l4")},
            "gpu_zonal_redundancy_disabled": True,
            "containers": [
                {
                    "image": image,
                    "ports": {"container_port": PORT},
                    "resources": {
                        "limits": {
                            "cpu": str(cfg.get("cpu", 4)),
                            "memory": cfg.get("memory", "16Gi"),
                            "nvidia.com/gpu": "1",
                        },
                        "cpu_idle": False,  # CPU always allocated: no throttling
                        "startup_cpu_boost": True,
                    },
                    "envs": env,
                    "startup_probe": {
                        "http_get": {"path": READY_PATH, "port": PORT},
                        "initial_delay_seconds": 0,
                        "period_seconds": 10,
                        "timeout_seconds": 5,
                        "failure_threshold": 60,  # up to 10 minutes to load the models
                    },
                    "liveness_probe": {"http_get": {"path": HEALTH_PATH, "port": PORT}, "period_seconds": 30},
                }
            ],
        },
        opts=pulumi.ResourceOptions(depends_on=[access]),
    )
    if cfg.get("public", True):
        gcp.cloudrunv2.ServiceIamMember(
            f"{name}-public", name=service.name, location=region, role="roles/run.invoker", member="allUsers"
        )
    for member in cfg.get("invokers", []):
        gcp.cloudrunv2.ServiceIamMember(
            f"{name}-invoker-{member}", name=service.name, location=region, role="roles/run.invoker", member=member
        )
    return {"url": service.uri, "repository": repository.id}
