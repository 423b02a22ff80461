"""Property: no request body makes the real server answer 5xx, die, or leak a request.

Hypothesis draws bodies for the three generation endpoints (tests/hostile.py: fields left out,
fitting, or hostile; any JSON value; raw bytes), derandomized so that CI runs the same few hundred
cases every time. Token counts stay small, so the run takes about a minute on a busy CPU.
"""
from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from conftest import metric, start_server, wait_until
from hostile import GENERATE, TIMEOUT_S, fuzz_problem, fuzz_requests, good_body

EXAMPLES = 300


@pytest.fixture(scope="module")
def fuzz_server():
    with start_server() as running:
        yield running


def test_no_body_makes_the_server_fail(fuzz_server):
    seen: dict[str, int] = {}
    with httpx.Client(base_url=fuzz_server.base_url, timeout=TIMEOUT_S) as client:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(fuzz_requests())
        def answers_sanely(request: tuple[str, bytes]) -> None:
            path, body = request
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            kind = f"{response.status_code // 100}xx"
            seen[kind] = seen.get(kind, 0) + 1
            problem = fuzz_problem(response)
            assert problem is None, f"{path} {body[:300]!r}: {problem}"

        answers_sanely()
        assert seen.get("2xx", 0) >= EXAMPLES // 10, seen  # the fuzzer reached the engine, not only the validators
        assert seen.get("4xx", 0) >= EXAMPLES // 2, seen

        assert client.get("/health").status_code == 200
        r = client.post(GENERATE, json=good_body(GENERATE, max_tokens=9, ignore_eos=True, temperature=0))
        assert r.status_code == 200 and len(r.json()["token_ids"]) == 9
    base = fuzz_server.base_url
    wait_until(lambda: metric(base, "kvsplice:num_requests_running") == 0
               and metric(base, "kvsplice:kv_cache_usage_perc") == 0, timeout=60, message="nothing left running")
    assert "Traceback" not in fuzz_server.log()
