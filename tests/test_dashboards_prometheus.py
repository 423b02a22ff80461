"""The dashboards' queries against our server, through a real Prometheus: our own Grafana
dashboard (deploy/compose/grafana/dashboards) and vLLM's example dashboard.

vLLM's queries below are the 12 panels' expressions of its example dashboard
(vllm-project/vllm, examples/online_serving/prometheus_grafana/grafana.json). Grafana's variables
are filled in as Grafana would (`$model_name` from its label_values query, `$instance`,
`$__rate_interval`). Prometheus (Debian's, which `make tools` installs) runs with the compose
stack's own prometheus.yml, its target pointed at the test server and its alert rules loaded, and
every query must return data: a series with a number, not an empty result.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port, wait_until
from tests.test_server_api import MODEL, TIMEOUT

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (make tools installs Debian's)")

STACK_CONFIG = REPO_ROOT / "deploy" / "compose" / "prometheus" / "prometheus.yml"
OUR_DASHBOARD = REPO_ROOT / "deploy" / "compose" / "grafana" / "dashboards" / "kvsplice.json"
RATE_INTERVAL = "1m"


def _quantiles(metric: str) -> list[str]:
    q = [f'histogram_quantile({p}, sum by(le) (rate(vllm:{metric}_bucket{{model_name="$model_name"}}'
         f'[$__rate_interval])))' for p in ("0.99", "0.95", "0.9", "0.5")]
    mean = (f'rate(vllm:{metric}_sum{{model_name="$model_name"}}[$__rate_interval])\n/\n'
            f'rate(vllm:{metric}_count{{model_name="$model_name"}}[$__rate_interval])')
    return [*q, mean]


PANELS: dict[str, list[str]] = {
    "E2E Request Latency": _quantiles("e2e_request_latency_seconds"),
    "Token Throughput": ['rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
                         'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])'],
    "Time Per Output Token Latency": _quantiles("time_per_output_token_seconds"),
    "Scheduler State": ['vllm:num_requests_running{model_name="$model_name"}',
                        'vllm:num_requests_swapped{model_name="$model_name"}',
                        'vllm:num_requests_waiting{model_name="$model_name"}'],
    "Time To First Token Latency": _quantiles("time_to_first_token_seconds"),
    "Cache Utilization": ['vllm:gpu_cache_usage_perc{model_name="$model_name"}',
                          'vllm:cpu_cache_usage_perc{model_name="$model_name"}'],
    "Request Prompt Length": [
        'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))'],
    "Request Generation Length": [
        'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))'],
    "Finish Reason": [
        'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))'],
    "Queue Time": ['rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])'],
    "Requests Prefill and Decode Time": [
        'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
        'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])'],
    "Max Generation Token in Sequence Group": [
        'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])'],
}


def stack_config_for(target: str, rules_dir: Path, own_address: str) -> dict:
    """The compose stack's prometheus.yml, its kvsplice job aimed at one static target, scraping
    every second; the rules it names load from the repository, its self-scrape at `own_address`."""
    config = yaml.safe_load(STACK_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(rules_dir / Path(f).name) for f in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kvsplice"]
    job.pop("dns_sd_configs")
    job.pop("relabel_configs", None)
    job["static_configs"] = [{"targets": [target], "labels": {"instance": "kvsplice"}}]
    (own,) = [j for j in config["scrape_configs"] if j["job_name"] == "prometheus"]
    own["static_configs"] = [{"targets": [own_address]}]
    return config


@pytest.fixture(scope="module")
def prometheus(server):
    """A real Prometheus scraping the session's server; its base URL."""
    workdir = Path(tempfile.mkdtemp(prefix="kvsplice-prometheus-"))
    port = free_port()
    config = stack_config_for(server.base_url.removeprefix("http://"), STACK_CONFIG.parent / "rules",
                              f"127.0.0.1:{port}")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(workdir / "prometheus.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            try:
                return httpx.get(url + "/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(ready, timeout=30, message="prometheus ready")
        # Prometheus applies new targets every 5 s: wait for the first scrape of the server.
        wait_until(lambda: query(url, 'up{job="kvsplice"} == 1'), timeout=30, message="the server scraped")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def query(prometheus: str, expr: str) -> list[dict]:
    r = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    return r.json()["data"]["result"]


@pytest.fixture(scope="module")
def traffic(server, prometheus) -> None:
    """Requests spread over several scrapes, so rates and increases have two samples to work from."""
    for i in range(8):
        body = {"prompt": f"Tell me a story, number {i}", "max_tokens": 6 + i, "ignore_eos": True}
        assert httpx.post(server.base_url + "/generate", json=body, timeout=TIMEOUT).status_code == 200
        time.sleep(0.4)
    wait_until(lambda: query(prometheus, f'increase(vllm:request_success_total{{model_name="{MODEL}"}}[1m]) > 0'),
               timeout=30, message="the requests to show in Prometheus")


def label_values(prometheus: str, label: str, match: str | None = None) -> list[str]:
    params = {"match[]": match} if match else {}
    return httpx.get(f"{prometheus}/api/v1/label/{label}/values", params=params, timeout=10).json()["data"]


def without_data(prometheus: str, panels: dict[str, list[str]], variables: dict[str, str]) -> list[str]:
    empty = []
    for panel, exprs in panels.items():
        for expr in exprs:
            filled = expr
            for name, value in variables.items():
                filled = filled.replace(name, value)
            values = [float(r["value"][1]) for r in query(prometheus, filled)]
            if not values or all(math.isnan(v) for v in values):
                empty.append(f"{panel}: {expr}")
    return empty


def test_every_panel_of_vllms_dashboard_gets_data(prometheus, traffic):
    assert MODEL in label_values(prometheus, "model_name")  # its $model_name: label_values(model_name)
    empty = without_data(prometheus, PANELS, {"$model_name": MODEL, "$__rate_interval": RATE_INTERVAL})
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_every_panel_of_our_dashboard_gets_data(prometheus, traffic):
    dashboard = json.loads(OUR_DASHBOARD.read_text())
    panels: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        if exprs:
            panels.setdefault(panel["title"], []).extend(exprs)
    assert len(panels) >= 10
    assert MODEL in label_values(prometheus, "model_name", "kvsplice:num_requests_running")
    assert "kvsplice" in label_values(prometheus, "instance", f'kvsplice:num_requests_running{{model_name=~"{MODEL}"}}')
    empty = without_data(prometheus, panels, {"$model_name": MODEL, "$instance": "kvsplice",
                                              "$__rate_interval": RATE_INTERVAL})
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_the_stack_rules_load_in_prometheus(prometheus):
    groups = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert groups and all(g["rules"] for g in groups)
    assert all(r.get("health") != "err" for g in groups for r in g["rules"])
