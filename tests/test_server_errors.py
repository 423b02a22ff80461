"""Bad input, overload, disconnects and API keys, against real servers (built-in model)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import metric, scrape, wait_until

MODEL = "kvsplice-tiny"
TOO_LONG = 100_000  # tokens: beyond any max_model_len the built-in model gets


def post(base_url: str, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(base_url + path, content=body, headers={"content-type": "application/json"},
                          timeout=60.0, **kwargs)
    return httpx.post(base_url + path, json=body, timeout=60.0, **kwargs)


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error shape every error answer has."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


BAD_REQUESTS = [
    # (path, body, words the message must contain)
    ("/generate", b'{"prompt": "hi", "max_tokens": ', ["JSON"]),
    ("/v1/completions", b"not json at all", ["JSON"]),
    ("/generate", b'["a", "list"]', ["JSON object"]),
    ("/generate", {"prompt": "hi", "max_tokens": "ten"}, ["max_tokens"]),
    ("/generate", {"prompt": 42}, ["prompt", "string"]),
    ("/generate", {"max_tokens": 3}, ["prompt", "required"]),
    ("/generate", {"prompt": "hi", "temprature": 0.5}, ["temprature", "unknown"]),
    ("/generate", {"prompt": "hi", "temperature": -1}, ["temperature"]),
    ("/generate", {"prompt": "hi", "top_p": 0}, ["top_p"]),
    ("/generate", {"prompt": "hi", "top_k": -5}, ["top_k"]),
    ("/generate", {"prompt": "hi", "max_tokens": 0}, ["max_tokens"]),
    ("/generate", {"prompt": "hi", "stop": ["", "x"]}, ["stop"]),
    ("/generate", {"prompt": []}, ["prompt", "empty"]),
    ("/generate", {"prompt": "hi", "max_tokens": TOO_LONG}, ["max_tokens", "context length"]),
    ("/generate", {"prompt": "word " * 5000, "max_tokens": 1}, ["prompt", "context length"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": TOO_LONG}, ["context length"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, ["n"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 17}, ["n"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 3, "best_of": 2}, ["best_of"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3, "stream": True}, ["best_of", "stream"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, ["logprobs"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, ["max_tokens"]),
    ("/v1/completions", {"model": MODEL, "prompt": [1, -3]}, ["token ids"]),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, ["prompt", "empty"]),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "hi"}}, ["prompt"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 3.0}, ["presence_penalty"]),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, ["repetition_penalty"]),
    ("/generate", {"prompt": "hi", "frequency_penalty": -2.5}, ["frequency_penalty"]),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, ["messages"]),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": TOO_LONG}, ["context length"]),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 2},
     ["top_p"]),
]


@pytest.mark.parametrize("path,body,words", BAD_REQUESTS, ids=[f"{p} {i}" for i, (p, _, _) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_400_with_a_message(server, path, body, words):
    r = post(server.base_url, path, body)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]


def test_form_encoded_body_is_400_with_a_hint(server):
    """`curl -d '{...}'` without a JSON content type."""
    r = httpx.post(server.base_url + "/generate", content=b'{"prompt": "hi"}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60.0)
    assert r.status_code == 400 and "application/json" in error_of(r)["message"]


def test_openai_endpoints_ignore_unknown_fields(server):
    r = post(server.base_url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "user": "me",
                                                  "some_future_field": {"x": 1}})
    assert r.status_code == 200, r.text


def test_unknown_model_is_404(server):
    r = post(server.base_url, "/v1/completions", {"model": "gpt-17", "prompt": "hi"})
    assert r.status_code == 404 and "gpt-17" in error_of(r)["message"]


def test_unknown_path_is_404_in_error_shape(server):
    r = httpx.get(server.base_url + "/v1/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == 404


def test_server_still_serves_after_bad_requests(server):
    r = post(server.base_url, "/generate", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["token_ids"]) == 2


# ---------------------------------------------------------------- disconnects free blocks


def _wait_idle(base_url: str) -> None:
    wait_until(lambda: metric(base_url, "kvsplice:num_requests_running") == 0
               and metric(base_url, "kvsplice:kv_cache_usage_perc") == 0, message="idle engine")


def finished(base_url: str) -> dict[str, float]:
    """kvsplice:request_success_total by finished_reason."""
    return {labels["finished_reason"]: value
            for labels, value in scrape(base_url).get("kvsplice:request_success_total", [])}


def test_streaming_disconnect_aborts_and_frees_blocks(server):
    base = server.base_url
    _wait_idle(base)
    finished_before = finished(base)
    body = {"prompt": "A very long story:", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/generate", json=body, timeout=60.0) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: dropping a half-read iterator closes the connection
        events = 0
        while events < 3:
            events += next(lines).startswith("data: ")
        assert metric(base, "kvsplice:num_requests_running") == 1
        assert metric(base, "kvsplice:kv_cache_usage_perc") > 0
    # leaving the block closed the connection mid-stream
    _wait_idle(base)
    # Aborted, not run on to its 900 tokens: the server counted an abort and no finished request.
    assert finished(base) == {**finished_before, "abort": finished_before.get("abort", 0) + 1}


def test_non_streaming_disconnect_aborts_and_frees_blocks(server):
    base = server.base_url
    _wait_idle(base)
    finished_before = finished(base)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(base + "/generate", json={"prompt": "Another long one", "max_tokens": 900, "ignore_eos": True},
                   timeout=httpx.Timeout(60.0, read=1.5))
    _wait_idle(base)
    assert finished(base) == {**finished_before, "abort": finished_before.get("abort", 0) + 1}


# ---------------------------------------------------------------- overload and API keys (one server)


API_KEY = "test-key-from-file"


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One running slot, one waiting slot; the API key and model name come from a config file and env."""
    from conftest import start_server

    config = tmp_path_factory.mktemp("config") / "serve.yaml"
    config.write_text(f"api_key: {API_KEY}\nserved_model_name: from-file\nmax-num-seqs: 1\nmax_waiting_requests: 1\n")
    with start_server("--config", str(config), env={"KVSPLICE_SERVED_MODEL_NAME": "from-env"}) as running:
        yield running


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_required_on_api_paths(small_server):
    base = small_server.base_url
    body = {"prompt": "hi", "max_tokens": 2}
    missing = post(base, "/generate", body)
    assert missing.status_code == 401 and error_of(missing)["type"] == "authentication_error"
    assert post(base, "/generate", body, headers=auth("wrong")).status_code == 401
    assert httpx.get(base + "/v1/models").status_code == 401
    assert post(base, "/generate", body, headers=auth()).status_code == 200
    # env beat the config file for the model name; the file's api_key and max_num_seqs applied
    models = httpx.get(base + "/v1/models", headers=auth()).json()
    assert models["data"][0]["id"] == "from-env"
    # probes and Prometheus need no key
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/metrics").status_code == 200


def test_overload_gets_429_with_retry_after(small_server):
    base = small_server.base_url
    body = {"prompt": "Tell a long tale", "max_tokens": 150, "ignore_eos": True}

    def send(_: int) -> httpx.Response:
        return post(base, "/generate", body, headers=auth())

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(send, range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses  # one running + one waiting get in
    assert set(statuses) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "max_waiting_requests" in error_of(r)["message"]
        else:
            assert len(r.json()["token_ids"]) == 150
    # the queue drained: new work is accepted again
    assert post(base, "/generate", {"prompt": "hi", "max_tokens": 1}, headers=auth()).status_code == 200
