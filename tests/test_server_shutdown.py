"""SIGTERM: stop taking new requests, let the in-flight one finish, exit 0."""
from __future__ import annotations

import signal
import threading

import httpx

from conftest import STOP_TIMEOUT_S, metric, start_server, wait_until


def _refused(base_url: str) -> bool:
    try:
        r = httpx.post(base_url + "/generate", json={"prompt": "hi", "max_tokens": 1}, timeout=5.0)
    except httpx.TransportError:  # the listening socket is closed
        return True
    return r.status_code == 503


def test_sigterm_drains_in_flight_requests_then_exits_0():
    with start_server("--drain-timeout-s", "60") as server:
        base, process = server
        result: dict = {}

        def long_request() -> None:
            result["response"] = httpx.post(base + "/generate", timeout=120.0, json={
                "prompt": "A story that takes a while:", "max_tokens": 200, "ignore_eos": True})

        client = threading.Thread(target=long_request)
        client.start()
        wait_until(lambda: metric(base, "kvsplice:num_requests_running") == 1, message="request running")
        process.send_signal(signal.SIGTERM)

        wait_until(lambda: _refused(base), message="new requests refused")
        client.join(120)
        response = result["response"]
        assert response.status_code == 200, response.text
        assert len(response.json()["token_ids"]) == 200 and response.json()["finish_reason"] == "length"
        assert process.wait(60) == 0
        log = server.log()
        assert "draining" in log and "Traceback" not in log


def test_drain_timeout_bounds_the_wait():
    """A request still running when drain_timeout_s ends is cut off with a 503; the exit stays clean."""
    with start_server("--drain-timeout-s", "1") as server:
        base, process = server
        result: dict = {}

        def endless_request() -> None:  # ~1000 tokens: far longer than the 1 s drain
            result["response"] = httpx.post(base + "/generate", timeout=120.0, json={
                "prompt": "Never ending", "max_tokens": 1000, "ignore_eos": True})

        client = threading.Thread(target=endless_request)
        client.start()
        wait_until(lambda: metric(base, "kvsplice:num_requests_running") == 1, message="request running")
        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT_S) == 0
        client.join(STOP_TIMEOUT_S)
        # Cut off by the drain timeout, not run on to its 1000 tokens (which would be a 200).
        response = result["response"]
        assert response.status_code == 503 and "shut down" in response.json()["error"]["message"]
        assert "Traceback" not in server.log()
