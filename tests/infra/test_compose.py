"""The local stack's files parse, Prometheus scrapes fnserve's /metrics, and every metric the Grafana dashboard
queries is one fnserve exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

COMPOSE = Path(__file__).parents[2] / "infra" / "compose"


def test_the_compose_file_runs_fnserve_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"fnserve", "prometheus", "grafana"}
    assert services["fnserve"]["build"]["dockerfile"] == "Dockerfile.cpu"
    assert (COMPOSE / services["fnserve"]["build"]["context"] / "Dockerfile.cpu").is_file()
    assert services["fnserve"]["read_only"] is True and "/tmp" in services["fnserve"]["tmpfs"]
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # nothing listens beyond this machine
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            assert (COMPOSE / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["fnserve:8000"]
    for provisioning in (COMPOSE / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(provisioning.read_text())["apiVersion"] == 1


async def test_every_metric_on_the_dashboard_exists(client: httpx.AsyncClient) -> None:
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "fnserve.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bfnserve_[a-z0-9_]+", target["expr"])
    }
    assert len(queried) >= 15
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    exported: set[str] = set()
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        exported.update(family.name + suffix for suffix in suffixes)
    assert queried <= exported, sorted(queried - exported)
