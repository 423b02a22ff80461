"""The server with tensor-parallel ranks: its own worker processes, or torchrun's. Real servers on
127.0.0.1 with the built-in model on the CPU (gloo), HTTP only."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, RunningServer, _wait_healthy, free_port, metric, stop_server

TIMEOUT = 120.0
PROMPTS = ["Once upon a time", "The sea was", "In the beginning the word"]


def generate(base: str, prompt: str, **fields) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, **fields}
    return httpx.post(base + "/generate", json=body, timeout=TIMEOUT)


def worker_pids(log: str) -> list[int]:
    match = re.search(r"started tensor-parallel ranks 1\.\.\d+ \(pids ([\d, ]+)\)", log)
    assert match, log[-3000:]
    return [int(pid) for pid in match.group(1).split(", ")]


def test_two_ranks_serve_what_one_serves(server, server_factory):
    sharded = server_factory("--tensor-parallel-size", "2", "--device", "cpu")
    for prompt in PROMPTS:
        one, two = generate(server.base_url, prompt), generate(sharded.base_url, prompt)
        assert two.status_code == 200, two.text
        assert two.json()["token_ids"] == one.json()["token_ids"]
    with ThreadPoolExecutor(3) as pool:  # concurrent requests: one batch over both ranks
        batch = list(pool.map(lambda p: generate(sharded.base_url, p).json()["token_ids"], PROMPTS))
    assert batch == [generate(server.base_url, p).json()["token_ids"] for p in PROMPTS]
    stream = httpx.post(sharded.base_url + "/v1/completions", timeout=TIMEOUT, json={
        "model": "kvsplice-tiny", "prompt": PROMPTS[0], "max_tokens": 8, "stream": True})
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    assert metric(sharded.base_url, "kvsplice:generation_tokens_total") > 16 * 6  # and the stream's
    assert "tensor_parallel_size 2" in sharded.log() and "rank 1 of 2 ready" in sharded.log()


def test_a_dead_rank_ends_the_server_with_status_4(server_factory):
    sharded = server_factory("--tensor-parallel-size", "2", "--device", "cpu")
    (pid,) = worker_pids(sharded.log())
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, sharded.base_url, "A long tale", max_tokens=900)
        os.kill(pid, signal.SIGKILL)
        r = running.result()
    assert r.status_code in (500, 503) and "engine" in r.json()["error"]["message"], r.text
    assert sharded.process.wait(60) == 4
    assert "exited with status -9" in sharded.log() and "supervisor restarts" in sharded.log()


@contextlib.contextmanager
def torchrun(*serve_args: str):
    """`torchrun --nproc-per-node 2 -m server.cli serve ...` on one host, rank 0 serving HTTP."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="kvsplice-torchrun-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "server.cli",
           "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    running = RunningServer(f"http://127.0.0.1:{port}", process, Path(log.name))
    try:
        _wait_healthy(running, 180.0)
        yield running
    finally:
        stop_server(process)
        log.close()


def test_torchrun_starts_the_ranks(server):
    with torchrun("--tensor-parallel-size", "2", "--device", "cpu") as launched:
        r = generate(launched.base_url, PROMPTS[2])
        assert r.status_code == 200 and r.json()["token_ids"] == generate(server.base_url, PROMPTS[2]).json()["token_ids"]
        assert "torchrun rank 1 of 2: following rank 0" in launched.log()
    # torchrun passed the supervisor's SIGTERM to both ranks (and exits 1 for having got it): rank 0
    # drained and told rank 1 to stop, rank 1 waited for that.
    log = launched.log()
    assert "draining" in log and "rank 1 stopping" in log, log[-3000:]
    assert "exited with status" not in log


def test_torchrun_with_another_world_size_is_refused():
    with pytest.raises(RuntimeError, match="tensor_parallel_size=1 but torchrun started 2 ranks"):
        with torchrun("--device", "cpu"):
            pass
