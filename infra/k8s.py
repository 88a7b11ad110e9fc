"""k8s: fnserve on any Kubernetes cluster with NVIDIA GPUs (the NVIDIA device plugin installed).

A Deployment whose pods ask for `nvidia.com/gpu`, scheduled by the tolerations and node selector from config,
probed on the real paths (startup and readiness on /readiness, liveness on /health), with a termination grace
period that covers the drain; a Service; an Ingress with TLS and timeouts long enough for SSE; a
HorizontalPodAutoscaler; a PodDisruptionBudget; the API keys in a Secret.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.config import HEALTH_PATH, PORT, READY_PATH, StackConfig


def build(cfg: StackConfig) -> dict[str, Any]:
    name = cfg.name
    if not cfg.image:
        raise ValueError(
            "k8s runs an image you have pushed: set `image` (e.g. registry.example.com/fnserve-cuda:0.1.0)"
        )
    if not cfg.domain:
        raise ValueError("k8s serves HTTPS through its Ingress: set `domain` (and `tlsSecret`)")
    namespace = cfg.get("namespace", "default")
    labels = {"app.kubernetes.io/name": "fnserve", "app.kubernetes.io/instance": name}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    provider = (
        k8s.Provider(f"{name}-k8s", namespace=namespace)
        if cfg.get("kubeconfig") is None
        else k8s.Provider(f"{name}-k8s", namespace=namespace, kubeconfig=cfg.get("kubeconfig"))
    )
    opts = pulumi.ResourceOptions(provider=provider)

    secret = k8s.core.v1.Secret(
        f"{name}-api-keys",
        metadata={"name": f"{name}-api-keys", "namespace": namespace, "labels": labels},
        string_data={"api-keys": cfg.api_keys} if cfg.api_keys is not None else {"api-keys": "[]"},
        opts=opts,
    )
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in cfg.environment().items()]
    env.append(
        {
            "name": "FNSERVE_API_KEYS",
            "value_from": {"secret_key_ref": {"name": secret.metadata.name, "key": "api-keys"}},
        }
    )
    container = {
        "name": "fnserve",
        "image": cfg.image,
        "ports": [{"name": "http", "container_port": PORT}],
        "env": env,
        "resources": {
            "requests": {"cpu": str(cfg.get("cpu", 4)), "memory": cfg.get("memory", "16Gi")},
            "limits": {"memory": cfg.get("memory", "16Gi"), "nvidia.com/gpu": str(cfg.get("gpus", 1))},
        },
        "startup_probe": {
            "http_get": {"path": READY_PATH, "port": "http"},
            "period_seconds": 10,
            "failure_threshold": 60,
        },
        "readiness_probe": {
            "http_get": {"path": READY_PATH, "port": "http"},
            "period_seconds": 5,
            "failure_threshold": 1,
        },
        "liveness_probe": {
            "http_get": {"path": HEALTH_PATH, "port": "http"},
            "period_seconds": 20,
            "failure_threshold": 3,
        },
        "security_context": {
            "run_as_non_root": True,
            "allow_privilege_escalation": False,
            "read_only_root_filesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volume_mounts": [{"name": "tmp", "mount_path": "/tmp"}],
    }
    deployment = k8s.apps.v1.Deployment(
        f"{name}-deployment",
        metadata=meta,
        spec={
            "replicas": cfg.min_instances,
            "selector": {"match_labels": labels},
            "strategy": {"type": "RollingUpdate", "rolling_update": {"max_unavailable": 0, "max_surge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "termination_grace_period_seconds": cfg.drain_seconds + 30,  # the drain, then some
                    "node_selector": cfg.get("nodeSelector", {}),
                    "tolerations": cfg.get(
                        "tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
                    ),
                    "volumes": [{"name": "tmp", "empty_dir": {}}],
                },
            },
        },
        opts=opts,
    )
    service = k8s.core.v1.Service(
        f"{name}-service",
        metadata=meta,
        spec={"selector": labels, "ports": [{"name": "http", "port": 80, "target_port": "http"}]},
        opts=opts,
    )
    timeout = str(cfg.get("streamTimeoutSeconds", 3600))
    k8s.networking.v1.Ingress(
        f"{name}-ingress",
        metadata={
            **meta,
            "annotations": {
                # ingress-nginx: keep streams open, do not buffer them, redirect HTTP to HTTPS
                "nginx.ingress.kubernetes.io/proxy-read-timeout": timeout,
                "nginx.ingress.kubernetes.io/proxy-send-timeout": timeout,
                "nginx.ingress.kubernetes.io/proxy-buffering": "off",
                "nginx.ingress.kubernetes.io/ssl-redirect": "true",
                "nginx.ingress.kubernetes.io/proxy-body-size": "8m",
                **cfg.get("ingressAnnotations", {}),
            },
        },
        spec={
            "ingress_class_name": cfg.get("ingressClass", "nginx"),
            "tls": [{"hosts": [cfg.domain], "secret_name": cfg.get("tlsSecret", f"{name}-tls")}],
            "rules": [
                {
                    "host": cfg.domain,
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "path_type": "Prefix",
                                "backend": {"service": {"name": service.metadata.name, "port": {"name": "http"}}},
                            }
                        ]
                    },
                }
            ],
        },
        opts=opts,
    )
    k8s.autoscaling.v2.HorizontalPodAutoscaler(
        f"{name}-hpa",
        metadata=meta,
        spec={
            "scale_target_ref": {"api_version": "apps/v1", "kind": "Deployment", "name": deployment.metadata.name},
            "min_replicas": cfg.min_instances,
            "max_replicas": cfg.max_instances,
            "metrics": cfg.get(
                "hpaMetrics",
                [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "average_utilization": 70}},
                    }
                ],
            ),
            "behavior": {"scale_down": {"stabilization_window_seconds": 300}},
        },
        opts=opts,
    )
    k8s.policy.v1.PodDisruptionBudget(
        f"{name}-pdb",
        metadata=meta,
        spec={"max_unavailable": 1, "selector": {"match_labels": labels}},
        opts=opts,
    )
    return {"url": f"https://{cfg.domain}", "namespace": namespace}
