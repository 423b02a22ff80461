"""Hostile requests: hand-written cases and a hypothesis strategy for request bodies.

The regression and fuzz tests import these. Run as a script against a running server it is the
battery, which prints what happened to every case and a count of the outcomes:

    python tests/hostile.py http://127.0.0.1:8000 --fuzz 500

Bodies are encoded here with `json.dumps` defaults on purpose: NaN and Infinity come out as the
bare words Python's parser accepts, and lone surrogates as `\\udxxx` escapes (valid JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import strategies as st

MODEL = "kvsplice-tiny"
GENERATE, COMPLETIONS, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
ENDPOINTS = (GENERATE, COMPLETIONS, CHAT)
TIMEOUT_S = 120.0
NAN, INF = math.nan, math.inf


def encode(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def send(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    return client.post(path, content=encode(body), headers={"content-type": "application/json"})


def good_body(path: str, **fields: Any) -> dict:
    """A request that would succeed (4 tokens), with `fields` replacing or adding fields."""
    base: dict[str, Any] = {"max_tokens": 4}
    if path == CHAT:
        base["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        base["prompt"] = "Hi"
    if path != GENERATE:
        base["model"] = MODEL
    return {**base, **fields}


# ---------------------------------------------------------------- hand-written cases


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any  # a dict or list (sent as JSON) or bytes (sent as they are)
    status: int
    words: tuple[str, ...]  # the error message must contain each (any case)


def _sampling_cases() -> list[Case]:
    """The issue's reproductions and their relatives, on every endpoint, streaming or not."""
    cases = []
    for path in ENDPOINTS:
        for stream in (False, True):
            tag = f"{path} {'stream' if stream else 'plain'}"

            def case(name: str, words: tuple[str, ...], **fields: Any) -> Case:
                return Case(f"{tag}: {name}", path, good_body(path, stream=stream, **fields), 400, words)

            cases += [
                case("seed 2^64", ("seed",), temperature=0.8, seed=2**64),
                case("seed below -2^63", ("seed",), temperature=0.8, seed=-(2**63) - 1),
                case("temperature NaN", ("temperature", "finite"), temperature=NAN),
                case("temperature Infinity", ("temperature", "finite"), temperature=INF),
                case("temperature -Infinity", ("temperature",), temperature=-INF),
                case("top_p NaN", ("top_p",), top_p=NAN),
                case("stop with a lone surrogate", ("stop", "surrogate"), stop=["ok", "\ud800"]),
                case("17 stop strings", ("stop", "at most"), stop=[f"s{i}" for i in range(17)]),
            ]
    return cases


def _body_cases() -> list[Case]:
    """Bodies refused before validation: bytes, nesting, size of the prompt list."""
    cases = []
    for path in ENDPOINTS:
        required = "messages" if path == CHAT else "prompt"
        cases += [
            Case(f"{path}: invalid UTF-8", path, b'{"prompt": "\xff\xfe"}', 400, ("UTF-8",)),
            Case(f"{path}: JSON nested 5000 deep", path, b"[" * 5000 + b"]" * 5000, 400, ("nested too deeply",)),
            Case(f"{path}: JSON nested 5000 deep in a field", path,
                 b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, ("nested too deeply",)),
            Case(f"{path}: empty body", path, b"", 400, ("empty", required)),
            Case(f"{path}: blank body", path, b" \n ", 400, ("empty", required)),
            Case(f"{path}: 5000-digit integer", path, b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, ("JSON", "digits")),
            Case(f"{path}: 1e999", path, encode(good_body(path))[:-1] + b', "temperature": 1e999}', 400,
                 ("temperature", "finite")),
            Case(f"{path}: key with a lone surrogate", path, {**good_body(path), "\udc80": 1}, 400, ("surrogate",)),
        ]
    return cases


def _prompt_cases() -> list[Case]:
    chat_user = [{"role": "user", "content": "x"}]
    return [
        Case("generate: empty prompt", GENERATE, good_body(GENERATE, prompt=""), 400, ("prompt", "empty")),
        Case("generate: empty prompt in a list", GENERATE, good_body(GENERATE, prompt=["ok", ""]), 400,
             ("prompt", "empty")),
        Case("completions: empty prompt", COMPLETIONS, good_body(COMPLETIONS, prompt=""), 400, ("prompt", "empty")),
        Case("generate: lone surrogate", GENERATE, good_body(GENERATE, prompt="a\ud800b"), 400,
             ("prompt", "surrogate")),
        Case("completions: lone surrogate in a list", COMPLETIONS, good_body(COMPLETIONS, prompt=["ok", "\udfff"]), 400,
             ("prompt.1", "surrogate")),
        Case("chat: half an emoji", CHAT, good_body(CHAT, messages=[{"role": "user", "content": "hi \ud83d"}]), 400,
             ("messages.0.content", "surrogate")),
        Case("chat: surrogate in a content part", CHAT,
             good_body(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]), 400,
             ("messages.0.content.0.text", "surrogate")),
        Case("chat: unknown role", CHAT, good_body(CHAT, messages=[{"role": "root", "content": "x"}]), 400,
             ("role",)),
        Case("generate: prompt nested 100 deep", GENERATE, {"prompt": json.loads("[" * 100 + "]" * 100)}, 400,
             ("prompt", "must be a string")),
        Case("chat: 2000 empty messages", CHAT, good_body(CHAT, messages=[{"role": "user", "content": ""}] * 2000),
             400, ("messages", "2000 messages")),
        Case("generate: 20000-character prompt", GENERATE, good_body(GENERATE, prompt="a" * 20000), 400,
             ("prompt", "characters", "context length")),
        Case("chat: 20000 characters of content", CHAT,
             good_body(CHAT, messages=chat_user * 2 + [{"role": "user", "content": "b" * 20000}]), 400,
             ("messages", "characters")),
        Case("generate: 400 prompts", GENERATE, good_body(GENERATE, prompt=["x"] * 400), 400,
             ("prompts in one request", "at most")),
        Case("completions: 400 token-id prompts", COMPLETIONS, good_body(COMPLETIONS, prompt=[[5]] * 400), 400,
             ("prompts in one request",)),
        Case("generate: 2000-character stop string", GENERATE, good_body(GENERATE, stop="z" * 2000), 400, ("stop",)),
    ]


CASES: list[Case] = _sampling_cases() + _body_cases() + _prompt_cases()

# Temperatures below 1e-5 are greedy (vLLM's convention): each must give temperature 0's tokens.
GREEDY_TEMPERATURES = (1e-300, 5e-324, 1e-38, 9.99e-6)


def problem_with(case: Case, response: httpx.Response) -> str | None:
    """None if the server answered the case as it should; else what was wrong."""
    if response.status_code != case.status:
        return f"status {response.status_code}, expected {case.status}: {response.text[:300]}"
    message = error_message(response)
    if message is None:
        return f"no error body: {response.text[:300]}"
    missing = [word for word in case.words if word.lower() not in message.lower()]
    return f"message {message!r} lacks {missing}" if missing else None


def error_message(response: httpx.Response) -> str | None:
    """The message of an OpenAI-shaped error body, or None if the body is not one."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return None
    return error["message"] if isinstance(error["message"], str) and error["message"] else None


# ---------------------------------------------------------------- the fuzzer's bodies

SPECIAL_TEXTS = ["", " ", "<|system|>", "<|begin_of_text|>", "<|end_of_text|>", "<|assistant|>\n", "\x00", "\ud800",
                 "\udfff", "a\ud83d", "\u202e", "\U0001f4a5", "\ufeff", "\n" * 50, "{{ 7*7 }}", "{% raise %}",
                 "a" * 5000, "%s%n"]
texts = st.one_of(st.text(max_size=30), st.text(st.characters(exclude_categories=()), max_size=8),
                  st.sampled_from(SPECIAL_TEXTS))
numbers = st.one_of(
    st.integers(-10, 10), st.integers(-(2**70), 2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 5e-324, 1e-38, 1e-5, 9.99e-6, 1e308, -0.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                      max_leaves=10)
# Token counts stay small whatever is drawn, so that a few hundred cases run in about a minute:
# valid ones are at most 8; the rest are the values a validator must refuse.
token_counts = st.one_of(st.integers(-2, 8), st.sampled_from([10**6, 2**63, 2**64, -(2**64)]),
                         st.floats(max_value=8.0), st.sampled_from([NAN, INF, 1e300, "4", None, True]))
token_ids = st.lists(st.one_of(st.integers(0, 8191), st.integers(-5, 10**20)), max_size=6)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "root", "", "<|system|>"])
content = st.one_of(texts, st.none(), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", ""]), "text": st.one_of(texts, st.none())}), max_size=3))
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": content}), max_size=4)
prompts = st.one_of(texts, st.lists(texts, max_size=4), token_ids, st.lists(token_ids, max_size=3))
stops = st.one_of(texts, st.lists(texts, max_size=4), st.none())

_SAMPLING = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
             "seed": st.integers(0, 2**32), "stop": stops, "stream": st.booleans(), "ignore_eos": st.booleans(),
             "max_tokens": token_counts}
# Fitting values are the accepted ones: the refused ones come from the hostile draws.
_OPENAI = {"model": st.just(MODEL), "n": st.integers(1, 2), "min_tokens": st.integers(0, 2),
           "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
           "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "logit_bias": st.just({}),
           "best_of": st.none()}
FIELDS: dict[str, dict[str, st.SearchStrategy]] = {
    GENERATE: {"prompt": st.one_of(texts, st.lists(texts, max_size=4)), **_SAMPLING},
    COMPLETIONS: {"prompt": prompts, **_SAMPLING, **_OPENAI, "logprobs": st.integers(0, 5), "echo": st.booleans(),
                  "suffix": st.sampled_from([None, ""])},
    CHAT: {"messages": messages, **_SAMPLING, **_OPENAI, "max_completion_tokens": token_counts,
           "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5), "tools": st.none()},
}
_TOKEN_FIELDS = {"max_tokens", "max_completion_tokens", "min_tokens"}
# For the clean third of the cases: what a well-behaved client sends, so that many reach the engine.
clean_texts = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=30)
CLEAN = {"prompt": st.one_of(clean_texts, st.lists(clean_texts, min_size=1, max_size=3)),
         "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                     "content": clean_texts}), min_size=1, max_size=3),
         "stop": st.one_of(st.none(), st.lists(clean_texts, max_size=2)),
         "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8)}


@st.composite
def fuzz_requests(draw) -> tuple[str, bytes]:
    """(path, body bytes): mostly objects whose fields are each left out, fitting, or hostile;
    sometimes any JSON value, or arbitrary bytes."""
    path = draw(st.sampled_from(ENDPOINTS))
    kind = draw(st.sampled_from(["fields"] * 8 + ["value", "bytes"]))
    if kind == "bytes":
        return path, draw(st.one_of(st.binary(max_size=64), st.just(encode(good_body(path))[:-1])))
    if kind == "value":
        return path, encode(draw(values))
    fields = FIELDS[path]
    # A third of the cases are clean (so that many requests get through to the engine); the others
    # have up to three hostile fields. Each other field is left out or given a fitting value.
    clean = draw(st.integers(0, 2)) == 0
    hostile = set() if clean else draw(st.sets(st.sampled_from(sorted(fields)), max_size=3))
    body: dict[str, Any] = {}
    for name, fitting in fields.items():
        if name in hostile:
            body[name] = draw(token_counts if name in _TOKEN_FIELDS else values)
        elif name in ("prompt", "messages") or draw(st.booleans()):
            body[name] = draw(CLEAN.get(name, fitting) if clean else fitting)
    if not clean and draw(st.booleans()):
        body[draw(texts)] = draw(values)  # a field nobody knows
    if path == CHAT and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4  # else the default is the whole context: minutes of generation on a CPU
    return path, encode(body)


def fuzz_problem(response: httpx.Response) -> str | None:
    """None for an answer a hostile client may get: a 4xx with an error body naming the problem,
    or a 200 whose body parses (an event stream ending in [DONE] without a server error in it)."""
    if response.status_code >= 500:
        return f"status {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        return None if error_message(response) else f"{response.status_code} without an error body: {response.text[:300]}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return _stream_problem(response.text)
    try:
        response.json()
    except ValueError:
        return f"200 whose body is not JSON: {response.text[:300]}"
    return None


def _stream_problem(text: str) -> str | None:
    events = [event for event in text.split("\n\n") if event.strip()]
    if not events or events[-1] != "data: [DONE]":
        return f"event stream does not end with [DONE]: {text[-300:]}"
    for event in events[:-1]:
        payload = json.loads(event.removeprefix("data: "))
        if isinstance(payload, dict) and "error" in payload and payload["error"]["code"] >= 500:
            return f"server error inside the stream: {event[:300]}"
    return None


# ---------------------------------------------------------------- the battery


def named_cause(response: httpx.Response) -> bool:
    """A 4xx whose message says what is wrong: it names a field, or the body and what is wrong with it."""
    message = error_message(response)
    if message is None:
        return False
    param = response.json()["error"]["param"]
    return bool(param) or any(word in message for word in ("request body", "JSON", "API key", "model", "overloaded"))


def alive(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def run_battery(base_url: str, fuzz_examples: int, randomize: bool = False) -> Counter:
    counts: Counter = Counter()
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
        for case in CASES:
            _tally(counts, client, case.path, case.body, expected=case)
        _run_fuzz(client, counts, fuzz_examples, randomize)
        for temperature in GREEDY_TEMPERATURES:
            _tally(counts, client, GENERATE, good_body(GENERATE, temperature=temperature))
    return counts


def _tally(counts: Counter, client: httpx.Client, path: str, body: Any, expected: Case | None = None) -> None:
    counts["tried"] += 1
    try:
        response = send(client, path, body)
    except httpx.HTTPError as exc:
        counts["no answer"] += 1
        print(f"NO ANSWER {path}: {type(exc).__name__}: {exc}")
    else:
        status = response.status_code
        kind = "5xx" if status >= 500 else "4xx with a named cause" if 400 <= status < 500 and named_cause(response) \
            else "4xx without a named cause" if status >= 400 else "2xx"
        counts[kind] += 1
        wrong = problem_with(expected, response) if expected else None
        if wrong:
            counts["hand-written case answered wrongly"] += 1
        if kind in ("5xx", "4xx without a named cause") or wrong:
            print(f"{kind.upper()} {path} {encode(body)[:120]!r}: {wrong or response.text[:200]}")
    if not alive(client):
        counts["server deaths"] += 1
        print(f"SERVER NOT HEALTHY after {path} {encode(body)[:120]!r}")


def _run_fuzz(client: httpx.Client, counts: Counter, examples: int, randomize: bool) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None, database=None, derandomize=not randomize,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_requests())
    def one(request: tuple[str, bytes]) -> None:
        _tally(counts, client, request[0], request[1])

    one()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send hostile requests to a running kvsplice server and count.")
    parser.add_argument("base_url", help="e.g. http://127.0.0.1:8000 (loopback only)")
    parser.add_argument("--fuzz", type=int, default=300, help="fuzzer examples after the hand-written cases")
    parser.add_argument("--random", action="store_true", help="new fuzz cases each run (default: the CI test's)")
    args = parser.parse_args(argv)
    if httpx.URL(args.base_url).host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("only a server on this machine (127.0.0.1) may be the target")
    counts = run_battery(args.base_url, args.fuzz, args.random)
    print(json.dumps(dict(counts), indent=2))
    return 0 if not (counts["5xx"] or counts["server deaths"] or counts["hand-written case answered wrongly"]) else 1


if __name__ == "__main__":
    sys.exit(main())
