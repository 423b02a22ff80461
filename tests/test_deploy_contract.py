"""One source of truth for the port and the probe and scrape paths: server/api/endpoints.py, which
the server's own routes and defaults use. Every deployment file must agree with it: the image
(EXPOSE, KVSPLICE_PORT, the health-check script), the Compose stack (published port, Prometheus'
job), the Kubernetes manifests (config, containerPort, Service, probes, ServiceMonitor)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from server.api.endpoints import DEFAULT_PORT, HEALTH_PATH, METRICS_PATH
from server.api.routes.ops import router
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_server_serves_what_endpoints_says():
    paths = {route.path for route in router.routes}
    assert {HEALTH_PATH, METRICS_PATH} <= paths
    assert Settings.model_fields["port"].default == DEFAULT_PORT


def test_image_exposes_the_port_and_checks_health_there():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {DEFAULT_PORT}$", dockerfile, re.M)
    assert re.search(rf"KVSPLICE_PORT={DEFAULT_PORT}\b", dockerfile)
    check = (DEPLOY / "docker" / "healthcheck.py").read_text()
    assert f'or "{DEFAULT_PORT}"' in check and f"{{port}}{HEALTH_PATH}" in check


def test_compose_publishes_the_port_and_prometheus_scrapes_it():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    servers = {name: s for name, s in compose["services"].items() if name.startswith("kvsplice")}
    assert servers
    for name, service in servers.items():
        assert any(str(p).endswith(f":{DEFAULT_PORT}") for p in service["ports"]), name
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "kvsplice"]
    assert job["metrics_path"] == METRICS_PATH
    assert all(sd["port"] == DEFAULT_PORT for sd in job["dns_sd_configs"])


def test_kubernetes_manifests_use_the_port_and_paths():
    base = DEPLOY / "k8s" / "base"
    assert yaml.safe_load((base / "config.yaml").read_text())["port"] == DEFAULT_PORT
    (deployment,) = _yaml_documents(base / "deployment.yaml")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "kvsplice"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == DEFAULT_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTH_PATH, "port": "http"}, probe
    (service,) = _yaml_documents(base / "service.yaml")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(DEFAULT_PORT, "http")]
    (monitor,) = _yaml_documents(base / "servicemonitor.yaml")
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", METRICS_PATH)]
