"""The real server with an fp8 KV cache: `--kv-cache-dtype` is accepted (and refused by name when
wrong), /metrics says what the cache is and what a token costs, generation works, and the load
tester reads the storage from /metrics."""
from __future__ import annotations

import subprocess
import sys

import httpx

from loadtest.server_metrics import parse_metrics
from tests.conftest import REPO_ROOT, scrape
from tests.test_server_api import TIMEOUT

# The built-in model: 6 layers, latent 128, RoPE 32, float32 on the CPU. An fp8 row at ratio 0.5:
# 64 fp8 code bytes + 16 (the scale, aligned) + 32 x 4 RoPE bytes.
FP8_ROW_AT_HALF = 64 + 16 + 32 * 4
LAYERS = 6


def test_fp8_server_reports_its_cache_and_generates(server_factory):
    server = server_factory("--compression-ratio", "0.5", "--kv-cache-dtype", "fp8", "--kv-cache-bytes", "4MiB")
    r = httpx.post(server.base_url + "/generate", json={"prompt": "To be, or not to be", "max_tokens": 8,
                                                         "temperature": 0}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["text"]
    samples = scrape(server.base_url)
    assert samples["kvsplice:kv_cache_bytes_per_token"][0][1] == LAYERS * FP8_ROW_AT_HALF
    (labels, value), = samples["kvsplice:cache_config_info"]
    assert value == 1.0
    assert (labels["kv_cache_dtype"], labels["compression_ratio"], labels["block_size"]) == ("fp8", "0.5", "16")
    assert int(labels["kv_bytes_per_token"]) == LAYERS * FP8_ROW_AT_HALF
    assert "kv_cache_dtype fp8" in server.log()
    # The load tester learns the storage from the same scrape.
    text = httpx.get(server.base_url + "/metrics", timeout=TIMEOUT).text
    assert parse_metrics(text, 0.0).kv_cache_dtype == "fp8"


def test_bad_kv_cache_dtype_is_refused_by_name():
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--kv-cache-dtype", "int4"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "kv_cache_dtype" in proc.stderr or "--kv-cache-dtype" in proc.stderr, proc.stderr[-2000:]
