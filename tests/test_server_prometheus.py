"""A real Prometheus (Debian's `prometheus` package) scrapes the server and finds the kvsplice: series."""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import httpx
import pytest

from conftest import free_port, wait_until

MUST_RUN = os.environ.get("CI") == "true"


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if MUST_RUN:
            pytest.fail("CI=true but no `prometheus` binary: install it with `apt-get install -y prometheus`")
        pytest.skip("no `prometheus` binary (apt-get install -y prometheus); required when CI=true")
    return binary


def test_prometheus_scrapes_kvsplice_metrics(server, tmp_path):
    binary = _prometheus_binary()
    httpx.post(server.base_url + "/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=60.0)
    target = server.base_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""\
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: kvsplice
            static_configs:
              - targets: ["{target}"]
        """))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def target_up() -> bool:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                targets = httpx.get(api + "/targets", timeout=2.0).json()["data"]["activeTargets"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return any(t["health"] == "up" and t["scrapeUrl"].startswith(server.base_url) for t in targets)

        wait_until(target_up, timeout=60, interval=0.5, message="Prometheus target up")

        def query(promql: str) -> list:
            return httpx.get(api + "/query", params={"query": promql}, timeout=5.0).json()["data"]["result"]

        wait_until(lambda: query("kvsplice:kv_cache_capacity_tokens"), interval=0.5,
                   message="kvsplice:kv_cache_capacity_tokens in Prometheus")
        [capacity] = query("kvsplice:kv_cache_capacity_tokens")
        assert capacity["metric"]["model_name"] == "kvsplice-tiny" and capacity["metric"]["job"] == "kvsplice"
        assert float(capacity["value"][1]) > 0
        names = {r["metric"]["__name__"] for r in query('{__name__=~"kvsplice:.+"}')}
        for name in ("kvsplice:num_requests_running", "kvsplice:kv_cache_usage_perc", "kvsplice:prompt_tokens_total",
                     "kvsplice:kv_cache_compression_ratio", "kvsplice:time_to_first_token_seconds_bucket",
                     "kvsplice:request_success_total"):
            assert name in names, sorted(names)
    finally:
        process.terminate()
        process.wait(30)
        log.close()
