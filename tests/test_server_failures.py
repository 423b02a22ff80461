"""One request failing inside the engine fails alone; the engine serves on; a dead engine ends the process.

Failures are made to happen in a real server (built-in model) with the engine's fault-injection
hook: KVSPLICE_INJECT_FAULT="point:seed" fails requests that carry that seed at that point. The
seed is only a tag: greedy requests ignore it for sampling.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import metric, start_server, wait_until
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams

SAMPLE, DETOKENIZE, OUTPUT, FORWARD, LOOP = 4242, 4243, 4244, 4245, 4343
FAULTS = f"sample:{SAMPLE},detokenize:{DETOKENIZE},output:{OUTPUT},forward:{FORWARD}"
PROMPTS = [f"Request {i} is about" + " the sea" * i for i in range(5)]
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def faulty_server():
    with start_server(env={"KVSPLICE_INJECT_FAULT": FAULTS}) as running:
        yield running


def generate(base: str, prompt: str, **fields) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **fields}
    return httpx.post(base + "/generate", json=body, timeout=TIMEOUT)


def sse_events(response: httpx.Response) -> list[str]:
    return [event for event in response.text.split("\n\n") if event.strip()]


def test_a_request_whose_sampling_fails_fails_alone(faulty_server):
    base = faulty_server.base_url
    reference = [generate(base, p).json()["token_ids"] for p in PROMPTS]
    with ThreadPoolExecutor(6) as pool:
        bad = pool.submit(generate, base, "A failing one", temperature=0.8, seed=SAMPLE, max_tokens=200)
        good = list(pool.map(lambda p: generate(base, p), PROMPTS))
        bad = bad.result()
    assert bad.status_code == 500, bad.text
    assert "sampling failed" in bad.json()["error"]["message"] and "InjectedFault" in bad.json()["error"]["message"]
    assert [r.status_code for r in good] == [200] * 5
    assert [r.json()["token_ids"] for r in good] == reference  # the batch it shared went on, token for token


@pytest.mark.parametrize("seed,cause", [(DETOKENIZE, "detokenize fault"), (OUTPUT, "building the output failed"),
                                        (FORWARD, "engine step failed")])
def test_each_failure_point_fails_the_request_with_its_cause(faulty_server, seed, cause):
    base = faulty_server.base_url
    r = generate(base, "Hello", seed=seed)
    assert r.status_code == 500 and cause in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "server_error"
    after = generate(base, "Hello")
    assert after.status_code == 200 and len(after.json()["token_ids"]) == 12


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "Hi"}),
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_a_failing_stream_ends_with_an_error_event_and_done(faulty_server, path, body):
    r = httpx.post(faulty_server.base_url + path, timeout=TIMEOUT,
                   json={**body, "max_tokens": 8, "stream": True, "seed": DETOKENIZE, "temperature": 0})
    events = sse_events(r)
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == 500 and "detokenize fault" in error["message"]


def test_one_failing_prompt_of_several_fails_the_call_and_frees_the_rest(faulty_server):
    base = faulty_server.base_url
    r = httpx.post(base + "/generate", timeout=TIMEOUT, json={
        "prompt": ["fine", "fine too"], "max_tokens": 50, "ignore_eos": True, "temperature": 0.8, "seed": SAMPLE})
    assert r.status_code == 500 and "sampling failed" in r.json()["error"]["message"]
    wait_until(lambda: metric(base, "kvsplice:num_requests_running") == 0
               and metric(base, "kvsplice:kv_cache_usage_perc") == 0, message="blocks freed")
    assert httpx.get(base + "/health").status_code == 200


def test_a_parameter_that_slips_past_validation_fails_only_its_own_request():
    """stop_token_ids are not checked against the vocabulary (the API never sends them): one out of
    range breaks the batched min_tokens masking, and only that request may fail for it."""
    engine = LLMEngine(EngineConfig(model="builtin", kv_cache_bytes=8 << 20, max_num_seqs=8))
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    broken = SamplingParams(max_tokens=6, temperature=0.0, min_tokens=3, stop_token_ids=[10**9])
    reference = {}
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"ref{i}", prompt, greedy)
    while engine.has_unfinished():
        reference.update({o.request_id: o for o in engine.step() if o.finished})
    engine.add_request("broken", "Break me", broken)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"ok{i}", prompt, greedy)
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["broken"].finish_reason == "error" and "sampling failed" in outs["broken"].error
    for i in range(3):
        assert outs[f"ok{i}"].finish_reason == "length"
        assert outs[f"ok{i}"].token_ids == reference[f"ref{i}"].token_ids


def test_a_dead_engine_loop_ends_the_process_with_status_4():
    with start_server(env={"KVSPLICE_INJECT_FAULT": f"loop:{LOOP}"}) as server:
        base, process = server
        r = generate(base, "Hi", seed=LOOP)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        assert process.wait(60) == 4
        assert "the engine loop died" in server.log() and "supervisor restarts" in server.log()
