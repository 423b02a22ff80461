"""The HTTP API against a real server (built-in model): /generate, the OpenAI client, logprobs, metrics."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from conftest import metric, scrape, wait_until

MODEL = "kvsplice-tiny"
TIMEOUT = 60.0
EXPECTED_METRICS = [
    "kvsplice:num_requests_running", "kvsplice:num_requests_running_peak", "kvsplice:num_requests_waiting", "kvsplice:kv_cache_usage_perc",
    "kvsplice:kv_cache_bytes_per_token", "kvsplice:kv_cache_capacity_tokens", "kvsplice:kv_cache_bytes_in_use",
    "kvsplice:kv_cache_compression_ratio", "kvsplice:prompt_tokens_total", "kvsplice:generation_tokens_total",
    "kvsplice:request_success_total", "kvsplice:num_preemptions_total",
    "kvsplice:time_to_first_token_seconds_bucket", "kvsplice:inter_token_latency_seconds_bucket",
    "kvsplice:e2e_request_latency_seconds_bucket", "kvsplice:request_queue_time_seconds_bucket",
    "kvsplice:request_prompt_tokens_bucket", "kvsplice:request_generation_tokens_bucket",
]


@pytest.fixture(scope="module")
def openai_client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=TIMEOUT)


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE body; asserts it ends with [DONE]."""
    lines = [line for line in response.text.split("\n\n") if line.strip()]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# ---------------------------------------------------------------- /generate


def test_health_and_models(server):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] > 0


def test_generate_plain(server):
    r = post(server, "/generate", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "token_ids", "finish_reason", "usage"}
    assert len(body["token_ids"]) == 8 and body["finish_reason"] == "length" and body["text"]
    usage = body["usage"]
    assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


def test_generate_list_of_prompts(server):
    r = post(server, "/generate", {"prompt": ["Hello", "The sea is"], "max_tokens": 4, "temperature": 0,
                                   "ignore_eos": True})
    assert r.status_code == 200, r.text
    results = r.json()
    assert isinstance(results, list) and len(results) == 2
    assert all(len(result["token_ids"]) == 4 for result in results)
    # each equals that prompt sent alone (greedy)
    alone = post(server, "/generate", {"prompt": "The sea is", "max_tokens": 4, "temperature": 0,
                                       "ignore_eos": True}).json()
    assert alone["token_ids"] == results[1]["token_ids"]


def test_generate_streaming_matches_plain(server):
    request = {"prompt": "To be or not", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    plain = post(server, "/generate", request).json()
    r = post(server, "/generate", {**request, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert len(events) >= 2  # really streamed, not one blob
    assert "".join(e["text"] for e in events) == plain["text"]
    assert [t for e in events for t in e["token_ids"]] == plain["token_ids"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"] == plain["usage"]
    assert all(e["finish_reason"] is None for e in events[:-1])


def test_generate_stop_string(server):
    first = post(server, "/generate", {"prompt": "Once", "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
    stop = first["text"][3:6]  # a string the greedy output is known to contain
    r = post(server, "/generate", {"prompt": "Once", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                   "stop": stop}).json()
    assert r["finish_reason"] == "stop" and stop not in r["text"] and first["text"].startswith(r["text"])


def test_seeded_sampling_is_reproducible(server):
    request = {"prompt": "Once", "max_tokens": 8, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    first, second = (post(server, "/generate", request).json()["token_ids"] for _ in range(2))
    assert first == second


# ---------------------------------------------------------------- OpenAI client


def test_openai_completion(openai_client):
    c = openai_client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert c.object == "text_completion" and c.model == MODEL and len(c.choices) == 1
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens <= 6
    again = openai_client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert again.choices[0].text == c.choices[0].text


def test_openai_completion_streaming(openai_client):
    whole = openai_client.completions.create(model=MODEL, prompt="The king", max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
    chunks = list(openai_client.completions.create(model=MODEL, prompt="The king", max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_openai_completion_batch_of_prompts(openai_client):
    c = openai_client.completions.create(model=MODEL, prompt=["Hello", "Good night"], max_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [choice.index for choice in c.choices] == [0, 1]
    assert c.usage.completion_tokens == 6


def test_openai_chat(openai_client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    c = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert isinstance(c.choices[0].message.content, str) and c.usage.completion_tokens <= 6
    chunks = list(openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.choices[0].message.content
    assert chunks[-1].usage.total_tokens == c.usage.total_tokens


def test_openai_chat_max_completion_tokens_and_logprobs(openai_client):
    c = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert c.usage.completion_tokens == 4 and len(content) == 4
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert math.isclose(token.logprob, max(t.logprob for t in token.top_logprobs), abs_tol=1e-5)


def test_echo_logprobs_score_the_prompt(openai_client):
    """lm-evaluation-harness's loglikelihood call: echo, logprobs=1, max_tokens 0 (or 1)."""
    prompt = "The quick brown fox jumps over the lazy dog"
    c = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = c.choices[0]
    lp = choice.logprobs
    n = c.usage.prompt_tokens
    assert choice.text == prompt and c.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert max(top.values()) >= value - 1e-6  # the chosen token is in its top dict
    # max_tokens 1 (what current lm-eval sends): the same prompt scores plus one generated token
    c1 = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                          temperature=0, extra_body={"ignore_eos": True})
    lp1 = c1.choices[0].logprobs
    assert len(lp1.token_logprobs) == n + 1 and c1.usage.completion_tokens == 1
    for a, b in zip(lp.token_logprobs[1:], lp1.token_logprobs[1:n]):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def test_echo_with_token_id_prompts(server):
    """lm-eval sends tokenized batches: a list of token-id lists."""
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": [[1, 2, 3, 4], [5, 6, 7]], "max_tokens": 1,
                                         "echo": True, "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [len(c["logprobs"]["token_logprobs"]) for c in choices] == [5, 4]
    assert all(v <= 0 for c in choices for v in c["logprobs"]["token_logprobs"][1:])


def test_streaming_echo_logprobs(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hello there", "max_tokens": 3, "echo": True,
                                         "logprobs": 2, "temperature": 0, "stream": True, "ignore_eos": True})
    events = sse_events(r)
    assert events[0]["choices"][0]["text"].startswith("Hello there")
    logprobs = [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    whole = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hello there", "max_tokens": 3, "echo": True,
                                             "logprobs": 2, "temperature": 0, "ignore_eos": True}).json()
    assert len(logprobs) == len(whole["choices"][0]["logprobs"]["token_logprobs"])


# ---------------------------------------------------------------- concurrency and metrics


def test_32_concurrent_greedy_requests_match_sequential(server):
    prompts = [f"Request number {i} says" + " more" * (i % 5) for i in range(32)]

    def generate(prompt: str) -> dict:
        r = post(server, "/generate", {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()

    alone = [generate(p) for p in prompts]
    wait_until(lambda: metric(server.base_url, "kvsplice:num_requests_running") == 0, message="idle server")
    before = scrape(server.base_url)
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(generate, prompts))
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]

    wait_until(lambda: metric(server.base_url, "kvsplice:kv_cache_usage_perc") == 0, message="KV usage back to 0")
    after = scrape(server.base_url)

    def delta(name: str) -> float:
        return sum(v for _, v in after[name]) - sum(v for _, v in before[name])

    assert delta("kvsplice:prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in together)
    generated = sum(r["usage"]["completion_tokens"] for r in together)
    assert delta("kvsplice:generation_tokens_total") == generated == 32 * 12
    assert delta("kvsplice:e2e_request_latency_seconds_count") == 32
    assert sum(v for _, v in after["kvsplice:num_requests_running"]) == 0
    assert sum(v for _, v in after["kvsplice:kv_cache_bytes_in_use"]) == 0


def test_running_peak_outlasts_a_burst_and_restarts_with_the_next_request(server):
    url = server.base_url
    wait_until(lambda: metric(url, "kvsplice:num_requests_running") + metric(url, "kvsplice:num_requests_waiting") == 0,
               message="idle server")
    body = {"prompt": "The burst", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: post(server, "/generate", body), range(4)))
    # Drained, and the mark still says how many ran together (48 decode steps: they overlap).
    assert (metric(url, "kvsplice:num_requests_running"), metric(url, "kvsplice:num_requests_running_peak")) == (0, 4)
    # A request at the idle server begins a new busy period, alone.
    assert post(server, "/generate", {**body, "max_tokens": 2}).status_code == 200
    assert metric(url, "kvsplice:num_requests_running_peak") == 1


def test_metrics_exposition(server):
    post(server, "/generate", {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    samples = scrape(server.base_url)
    for name in EXPECTED_METRICS:
        assert name in samples, name
        assert all(labels.get("model_name") == MODEL for labels, _ in samples[name]), name
    reasons = {labels["finished_reason"] for labels, _ in samples["kvsplice:request_success_total"]}
    assert "length" in reasons
    value = {name: samples[name][0][1] for name in EXPECTED_METRICS if not name.endswith("_bucket")}
    assert value["kvsplice:kv_cache_capacity_tokens"] > 0 and value["kvsplice:kv_cache_bytes_per_token"] > 0
    assert 0 < value["kvsplice:kv_cache_compression_ratio"] <= 1
    assert 0 <= value["kvsplice:kv_cache_usage_perc"] <= 1
