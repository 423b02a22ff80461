"""What a vLLM user expects of the real server: /tokenize and /detokenize agree with the ids the
completions endpoints feed the model, /tokenizer_info, /v1/models/{id}, /version, /ping, `serve MODEL`
with several served names, logit_bias, response_format, and a log line per request."""
from __future__ import annotations

import json
import signal

import httpx
import pytest
from openai import NotFoundError, OpenAI

from tests.test_server_api import MODEL, TIMEOUT, post

TEXT = "Once upon a time, in a land far away"


def test_tokenize_matches_the_prompt_the_model_gets(server):
    r = post(server, "/tokenize", {"prompt": TEXT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    usage = post(server, "/v1/completions", {"model": MODEL, "prompt": TEXT, "max_tokens": 1}).json()["usage"]
    assert body["count"] == len(body["tokens"]) == usage["prompt_tokens"]
    assert body["max_model_len"] > 0 and len(body["token_strs"]) == body["count"]
    plain = post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False}).json()
    assert plain["count"] <= body["count"] and body["tokens"][-plain["count"]:] == plain["tokens"]
    back = post(server, "/detokenize", {"model": MODEL, "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"].strip() == TEXT


def test_tokenize_chat_messages_as_the_chat_endpoint_does(server):
    messages = [{"role": "user", "content": "Say hello."}]
    body = post(server, "/tokenize", {"messages": messages}).json()
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert body["count"] == chat["usage"]["prompt_tokens"]


def test_bad_tokenizer_requests_are_named_400s_and_404s(server):
    cases = [
        ({}, "exactly one of prompt and messages"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of prompt and messages"),
        ({"prompt": "a", "bogus": 1}, "bogus"),
    ]
    for body, words in cases:
        r = post(server, "/tokenize", body)
        assert r.status_code == 400 and words in r.text, (body, r.text)
    r = post(server, "/detokenize", {"tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = post(server, "/tokenize", {"model": "not-this-one", "prompt": "a"})
    assert r.status_code == 404 and "not-this-one" in r.text


def test_tokenizer_info_describes_the_tokenizer(server):
    info = httpx.get(server.base_url + "/tokenizer_info", timeout=TIMEOUT).json()
    assert info["vocab_size"] > 0 and info["model_max_length"] > 0 and info["tokenizer_class"]
    assert info["eos_token"] is not None and isinstance(info["eos_token_id"], int)


def test_models_retrieve_version_and_ping(server):
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    assert client.models.retrieve(MODEL).id == MODEL
    try:
        client.models.retrieve("someone/else")
        raise AssertionError("an unknown model must be a 404")
    except NotFoundError as exc:
        assert "someone/else" in str(exc)
    version = httpx.get(server.base_url + "/version", timeout=TIMEOUT).json()["version"]
    assert version and version != "unknown"
    assert httpx.get(server.base_url + "/ping", timeout=TIMEOUT).status_code == 200
    assert httpx.post(server.base_url + "/ping", timeout=TIMEOUT).status_code == 200


def test_serve_takes_the_model_as_its_argument_and_several_names(server_factory):
    running = server_factory("builtin", "--served-model-name", "by-argument", "second")
    models = httpx.get(running.base_url + "/v1/models", timeout=TIMEOUT).json()["data"]
    assert [m["id"] for m in models] == ["by-argument", "second"]
    assert httpx.get(running.base_url + "/v1/models/second", timeout=TIMEOUT).json()["id"] == "second"
    r = post(running, "/v1/completions", {"model": "second", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "by-argument"  # responses name the first


def test_logit_bias_and_response_format(server):
    forced = post(server, "/tokenize", {"prompt": " the", "add_special_tokens": False}).json()["tokens"][-1]
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(forced): 100}}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    ids = post(server, "/tokenize", {"prompt": r.json()["choices"][0]["text"], "add_special_tokens": False}).json()
    assert set(ids["tokens"]) == {forced}
    for extra, param in [({"logit_bias": {"10000000": 5}}, "logit_bias"), ({"logit_bias": {"x": 5}}, "logit_bias"),
                         ({"logit_bias": {"5": 500}}, "logit_bias"),
                         ({"response_format": {"type": "json_object"}}, "response_format")]:
        r = post(server, "/v1/completions", {**body, **extra})
        assert r.status_code == 400 and param in r.text, (extra, r.text)
    ok = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 2, "response_format": {"type": "text"}})
    assert ok.status_code == 200, ok.text


def test_each_finished_request_gets_a_log_line_unless_disabled(server_factory):
    def finish_one(running) -> str:
        r = post(running, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200
        return r.json()["id"]

    logged = server_factory()
    finish_one(logged)
    quiet = server_factory("--disable-log-requests")
    finish_one(quiet)
    for running in (logged, quiet):
        running.process.send_signal(signal.SIGTERM)
        running.process.wait(timeout=TIMEOUT)
    assert "finished (length): 2 prompt + 3 generated tokens" in logged.log()
    assert "finished (" not in quiet.log()


def test_tokenizer_chat_template_and_max_logprobs_flags(server_factory, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}ASSISTANT:")
    running = server_factory("--tokenizer", "builtin", "--chat-template", str(template), "--max-logprobs", "2")
    messages = [{"role": "user", "content": "Say hello."}]
    via_template = post(running, "/tokenize", {"messages": messages, "return_token_strs": True}).json()
    expected = post(running, "/tokenize", {"prompt": "[user] Say hello.\nASSISTANT:",
                                           "add_special_tokens": False}).json()
    assert via_template["tokens"] == expected["tokens"]
    ok = post(running, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1, "logprobs": 2})
    assert ok.status_code == 200, ok.text
    r = post(running, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1, "logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs" and "max_logprobs" in r.text


def test_bad_chat_template_or_tokenizer_stops_start_up_by_name(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    for flags, words in ((["--chat-template", "{% for %}"], "chat_template"),
                         (["--chat-template", str(tmp_path / "missing.jinja")], "chat_template: file not found"),
                         (["--tokenizer", str(tmp_path / "no-such-dir")], "tokenizer")):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "1", *flags], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=180, env={"HF_HUB_OFFLINE": "1",
                                                                               **__import__("os").environ})
        assert proc.returncode == 2 and words in proc.stderr, (flags, proc.stderr[-1500:])


def test_n_best_of_and_penalties_through_the_openai_endpoints(server):
    base = {"model": MODEL, "prompt": ["Once upon", "In the"], "max_tokens": 5, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}
    r = post(server, "/v1/completions", {**base, "n": 3})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert len({c["text"] for c in choices[:3]}) > 1  # the copies of one seeded prompt differ
    assert r.json()["usage"]["completion_tokens"] == 30
    again = post(server, "/v1/completions", {**base, "n": 3}).json()["choices"]
    assert [c["text"] for c in again] == [c["text"] for c in choices]  # and reproduce
    single = post(server, "/v1/completions", {**base, "prompt": "Once upon"}).json()["choices"][0]["text"]
    assert single == choices[0]["text"]  # copy 0 keeps the request's own seed

    best = post(server, "/v1/completions", {**base, "prompt": "Once upon", "n": 2, "best_of": 4, "logprobs": 0})
    assert best.status_code == 200, best.text
    body = best.json()
    scores = [sum(c["logprobs"]["token_logprobs"]) for c in body["choices"]]
    pool = post(server, "/v1/completions", {**base, "prompt": "Once upon", "n": 4, "logprobs": 0}).json()["choices"]
    pool_scores = sorted((sum(c["logprobs"]["token_logprobs"]) for c in pool), reverse=True)
    assert sorted(scores, reverse=True) == pytest.approx(pool_scores[:2])  # the two most likely of the same four
    assert body["usage"]["completion_tokens"] == 20  # all four generated are billed
    hidden = post(server, "/v1/completions", {**base, "prompt": "Once upon", "n": 1, "best_of": 2}).json()
    assert hidden["choices"][0]["logprobs"] is None  # ranked by log-probabilities it did not ask to see

    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4, "n": 2, "seed": 1, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert chat.status_code == 200
    events = [json.loads(line[6:]) for line in chat.text.split("\n\n") if line.startswith("data: {")]
    assert {c["index"] for e in events for c in e["choices"]} == {0, 1}
    assert events[-1]["usage"]["completion_tokens"] == 8

    greedy = {"model": MODEL, "prompt": "the the the the the", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    plain = post(server, "/v1/completions", greedy).json()["choices"][0]["text"]
    penalized = post(server, "/v1/completions", {**greedy, "frequency_penalty": 2.0, "repetition_penalty": 1.5})
    assert penalized.status_code == 200 and penalized.json()["choices"][0]["text"] != plain
    gen = httpx.post(server.base_url + "/generate", json={"prompt": "the the the", "max_tokens": 4,
                                                          "temperature": 0, "presence_penalty": 1.0}, timeout=TIMEOUT)
    assert gen.status_code == 200, gen.text
