"""One request failing inside the engine is that request's 500; the others go on.

The real engine gives no way to make one request fail from outside, so this test runs the app
in-process over a stub with AsyncLLMEngine's interface whose outputs are scripted.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.testclient import TestClient
from transformers import AutoTokenizer

from kvsplice.model_source import BUILTIN_MODEL_DIR
from server.api.app import build_app
from server.engine.async_engine import EngineStats
from server.engine.outputs import RequestOutput, RequestTimes
from server.settings import load_settings


class ScriptedEngine:
    """Emits token 100 `max_tokens` times; prompts containing FAIL end in an error, CRASH raise."""

    model_name = "scripted"
    max_model_len = 256

    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_MODEL_DIR))
        self.is_alive = False

    def start(self) -> None:
        self.is_alive = True

    def shutdown(self) -> None:
        self.is_alive = False

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks_total=1, num_blocks_free=1,
                           block_size=16, kv_bytes_per_token=1, kv_capacity_tokens=16, kv_bytes_in_use=0,
                           compression_ratio=1.0, num_preemptions_total=0, prompt_tokens_total=0,
                           generation_tokens_total=0)

    async def generate(self, prompt: list[int], params, request_id: str):
        text = self.tokenizer.decode(prompt)
        tokens: list[int] = []
        for step in range(params.max_tokens):
            await asyncio.sleep(0.01)
            if "CRASH" in text:
                raise RuntimeError("scripted crash")
            failed = "FAIL" in text and step == 1
            tokens.append(100)
            finished = failed or step == params.max_tokens - 1
            yield RequestOutput(
                request_id=request_id, prompt_token_ids=prompt, text="x" * len(tokens), delta_text="x",
                token_ids=list(tokens), delta_token_ids=[100], finished=finished,
                finish_reason=("error" if failed else "length") if finished else None,
                error="scripted failure" if failed else None, times=RequestTimes(arrival=0.0))
            if finished:
                return


@pytest.fixture
def client():
    app = build_app(ScriptedEngine(), load_settings())
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.parametrize("prompt,message", [("please FAIL", "scripted failure"), ("CRASH", "scripted crash")])
def test_a_failing_request_is_500_and_others_succeed(client, prompt, message):
    def send(p: str):
        return client.post("/generate", json={"prompt": p, "max_tokens": 5})

    with ThreadPoolExecutor(3) as pool:
        good1, bad, good2 = pool.map(send, ["fine", prompt, "also fine"])
    assert bad.status_code == 500 and message in bad.json()["error"]["message"]
    assert good1.status_code == good2.status_code == 200
    assert len(good1.json()["token_ids"]) == 5


def test_one_failing_prompt_of_several_fails_the_call_and_frees_the_rest(client):
    r = client.post("/generate", json={"prompt": ["fine", "CRASH", "fine too"], "max_tokens": 50})
    assert r.status_code == 500 and "scripted crash" in r.json()["error"]["message"]
    assert client.app.state.ctx.client.in_flight == 0  # every admitted request was released
    assert client.post("/generate", json={"prompt": "fine", "max_tokens": 2}).status_code == 200


def test_a_failing_stream_ends_with_an_error_event(client):
    r = client.post("/generate", json={"prompt": "FAIL", "max_tokens": 5, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    assert "scripted failure" in events[-2] and '"error"' in events[-2]


def test_openai_failure_uses_the_error_shape(client):
    r = client.post("/v1/completions", json={"prompt": "FAIL", "max_tokens": 5})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "scripted failure" in r.json()["error"]["message"]


def test_dead_engine_makes_health_and_api_503(client):
    client.app.state.ctx.engine.is_alive = False
    assert client.get("/health").status_code == 503
    r = client.post("/generate", json={"prompt": "hi"})
    assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    assert client.get("/metrics").status_code == 200  # still scrapeable
