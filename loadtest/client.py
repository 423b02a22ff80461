"""HTTP to one server: which model it serves, one streamed completion timed chunk by chunk, health.

Times come from `time.perf_counter` (monotonic, high resolution). Token counts come from the
server's `usage` (stream_options.include_usage), never from counting chunks: a chunk may carry
several tokens (or none, when a token's text is not complete yet).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from loadtest.workload import RequestSpec

CONNECT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 3.0
# Failures that may mean the server itself is gone: each is followed by a /health check.
SUSPICIOUS_KINDS = frozenset({"connect error", "connection lost", "timeout", "HTTP 503"})


class ServerUnavailable(RuntimeError):
    """The server cannot be reached or does not look like an OpenAI-compatible completions server."""


@dataclass(frozen=True)
class ServerInfo:
    url: str
    model: str
    max_model_len: int | None


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds, `start_s` on the session clock."""

    index: int
    prompt_words: int
    max_tokens: int
    start_s: float = 0.0
    ok: bool = False
    error_kind: str | None = None  # groups failures in reports: "HTTP 429", "timeout", "cancelled", ...
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0
    unattributed_tokens: int = 0  # tokens `usage` reports that no chunk accounted for
    finish_reason: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (the request's decode speed)."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or (self.completion_tokens or 0) < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def failed(self) -> bool:
        return not self.ok and self.error_kind not in (None, "cancelled")

    def fail(self, kind: str, message: str) -> RequestResult:
        self.ok, self.error_kind, self.error = False, kind, message[:300]
        return self


def new_http_client(request_timeout_s: float, api_key: str | None = None) -> httpx.AsyncClient:
    # No pool limit: the load generator must never be the thing that caps concurrency. trust_env
    # off: a proxy from the environment must not sit between us and a loopback server.
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        timeout=httpx.Timeout(request_timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        headers=headers, trust_env=False)


async def discover(http: httpx.AsyncClient, url: str, model: str | None = None) -> ServerInfo:
    """The served model (GET /v1/models), or ServerUnavailable with the reason."""
    try:
        response = await http.get(url + "/v1/models", timeout=CONNECT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ServerUnavailable(f"cannot reach {url}: {_describe(exc)}") from None
    if response.status_code != 200:
        raise ServerUnavailable(f"{url}/v1/models answered HTTP {response.status_code}: {_error_message(response)}")
    try:
        cards = response.json()["data"]
        card = next((c for c in cards if c["id"] == model), cards[0]) if model else cards[0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ServerUnavailable(f"{url}/v1/models did not list a model") from None
    return ServerInfo(url, model or card["id"], card.get("max_model_len"))


async def health_problem(http: httpx.AsyncClient, url: str) -> str | None:
    """None if /health says 200, else why not (unreachable, draining, engine down)."""
    try:
        response = await http.get(url + "/health", timeout=HEALTH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return f"{url} stopped answering ({_describe(exc)})"
    if response.status_code != 200:
        return f"{url}/health answered HTTP {response.status_code}: {response.text[:200]}"
    return None


class CompletionClient:
    """Streams /v1/completions requests with fixed sampling settings."""

    def __init__(self, http: httpx.AsyncClient, info: ServerInfo, sampling: dict, clock0: float):
        self._http = http
        self._info = info
        self._sampling = sampling  # temperature, ignore_eos, ... sent with every request
        self._clock0 = clock0

    def new_result(self, spec: RequestSpec) -> RequestResult:
        return RequestResult(spec.index, spec.prompt_words, spec.max_tokens)

    async def complete(self, spec: RequestSpec, result: RequestResult) -> RequestResult:
        """Fill `result` in place (so a cancelled request keeps what was measured) and return it."""
        body = {"model": self._info.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **self._sampling}
        if "seed" in body:
            body["seed"] += spec.index  # a different but reproducible sample per request
        start = time.perf_counter()
        result.start_s = start - self._clock0
        try:
            async with self._http.stream("POST", self._info.url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return result.fail(f"HTTP {response.status_code}", _error_message(response))
                await _read_events(response, result, start)
        except httpx.TimeoutException as exc:
            return result.fail("timeout", _describe(exc))
        except httpx.ConnectError as exc:
            return result.fail("connect error", _describe(exc))
        except httpx.TransportError as exc:  # reset, or the body cut short: the server went away mid-answer
            return result.fail("connection lost", _describe(exc))
        return result


async def _read_events(response: httpx.Response, result: RequestResult, start: float) -> None:
    last_token_at: float | None = None
    tokens_seen, done, usage = 0, False, None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        now = time.perf_counter()
        try:
            event = json.loads(data)
        except ValueError:
            result.fail("bad event", f"not JSON: {data[:100]!r}")
            return
        if event.get("error"):  # an error after the 200 went out is reported in-band
            error = event["error"]
            result.fail("stream error", error.get("message", str(error)) if isinstance(error, dict) else str(error))
            return
        usage = event.get("usage") or usage
        for choice in event.get("choices") or ():
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
            count = _tokens_in(choice)
            if count == 0:
                continue
            result.chunks += 1
            if last_token_at is None:
                result.ttft_s = now - start
            else:
                # Several tokens in one chunk arrived together: split the gap so ITL stays per token.
                result.itl_s.extend([(now - last_token_at) / count] * count)
            last_token_at = now
            tokens_seen += count
    end = time.perf_counter()
    result.e2e_s = end - start
    if not done:
        result.fail("incomplete stream", "the stream ended without data: [DONE]")
        return
    result.ok = True
    result.ttft_s = result.e2e_s if result.ttft_s is None else result.ttft_s  # no text at all: first = last
    result.completion_tokens = usage.get("completion_tokens", tokens_seen) if usage else tokens_seen
    result.prompt_tokens = usage.get("prompt_tokens") if usage else None
    result.unattributed_tokens = max(0, result.completion_tokens - tokens_seen)


def _tokens_in(choice: dict) -> int:
    """Tokens a completion chunk carries: exact with logprobs, else one per chunk with text."""
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message", error)) if isinstance(error, dict) else str(error or response.text)
    except (ValueError, AttributeError):
        return response.text[:300]


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
