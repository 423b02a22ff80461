"""The port and paths that deployments rely on: the image's EXPOSE and HEALTHCHECK, the Compose
stack's ports and Prometheus job, the Kubernetes probes, Service and ServiceMonitor. They are
defined here once; tests/test_deploy_contract.py checks every deployment file against them."""
from __future__ import annotations

DEFAULT_PORT = 8000
HEALTH_PATH = "/health"  # 200 while the engine runs and the server is not draining
METRICS_PATH = "/metrics"  # Prometheus text format
