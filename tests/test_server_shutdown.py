"""SIGTERM: stop taking new requests, let the in-flight one finish, exit 0; or cut it at the drain timeout, exit 3."""
from __future__ import annotations

import json
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


def test_drain_timeout_cuts_what_still_runs_with_an_error_and_exits_3():
    """Requests still running when drain_timeout_s ends are cut: a stream gets an error event and
    [DONE], a non-streaming request a 503; the log counts them and the exit status is 3."""
    with start_server("--drain-timeout-s", "1") as server:
        base, process = server
        results: dict = {}
        endless = {"prompt": "Never ending", "max_tokens": 1000, "ignore_eos": True}  # far longer than 1 s

        def send(name: str, body: dict) -> None:
            results[name] = httpx.post(base + "/generate", timeout=120.0, json=body)

        clients = [threading.Thread(target=send, args=("plain", endless)),
                   threading.Thread(target=send, args=("stream", {**endless, "stream": True}))]
        for client in clients:
            client.start()
        wait_until(lambda: metric(base, "kvsplice:num_requests_running") == 2, message="both requests running")
        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT_S) == 3
        for client in clients:
            client.join(STOP_TIMEOUT_S)
        plain, stream = results["plain"], results["stream"]
        assert plain.status_code == 503 and "drain_timeout_s" in plain.json()["error"]["message"]
        events = [e for e in stream.text.split("\n\n") if e.strip()]
        assert stream.status_code == 200 and events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == 503 and "drain_timeout_s" in error["message"]
        assert len(events) > 3  # tokens streamed before the cut
        log = server.log()
        assert "cut 2 in-flight request(s)" in log and "Traceback" not in log
