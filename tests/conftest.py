"""Shared fixtures: run the real server (`python -m server.cli serve`) as a subprocess.

    with start_server("--max-num-seqs", "4", env={"KVSPLICE_API_KEY": "k"}) as (base_url, process):
        httpx.get(base_url + "/health")

or, in a test, the `server_factory` fixture (same arguments; servers stop at teardown), or the
session-wide `server` fixture (the built-in model with default settings).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Bounds for waits that end as soon as their condition holds; generous, because a busy 2-core CI
# machine (other jobs, a CPU-burning process) can be many times slower than an idle one. No test
# asserts how fast anything happened.
STARTUP_TIMEOUT_S = 180.0  # model load
STOP_TIMEOUT_S = 60.0  # a graceful drain and exit
WAIT_TIMEOUT_S = 60.0  # wait_until's default


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def __iter__(self) -> Iterator:
        # `base_url, process = server` unpacks like a tuple.
        return iter((self.base_url, self.process))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_healthy(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode} during start-up:\n{server.log()[-5000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not healthy after {timeout:.0f}s:\n{server.log()[-5000:]}")


def stop_server(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (a graceful drain), then SIGKILL if it overstays; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def start_server(*cli_args: str, env: dict[str, str] | None = None,
                 timeout: float = STARTUP_TIMEOUT_S) -> Iterator[RunningServer]:
    """Start `kvsplice serve` on a free 127.0.0.1 port, wait for /health, stop it on exit.

    `cli_args` go after `serve` (e.g. "--max-num-seqs", "2"); `env` is added to this process's
    environment. Output goes to a log file, not a pipe, so a chatty server never blocks on it.
    """
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="kvsplice-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *cli_args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", process, Path(log_file.name))
    try:
        _wait_healthy(server, timeout)
        yield server
    finally:
        stop_server(process)
        log_file.close()


def scrape(base_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics, parsed: sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    text = httpx.get(base_url + "/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0.0 when there are none)."""
    return sum(value for got, value in scrape(base_url).get(name, []) if labels.items() <= got.items())


def wait_until(condition, timeout: float = WAIT_TIMEOUT_S, interval: float = 0.1, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def server_factory():
    """`server_factory(*cli_args, env=None)` -> RunningServer; every server is stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(start_server(*args, **kwargs))


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One server with the built-in model and default settings, shared by the whole session."""
    with start_server() as running:
        yield running
