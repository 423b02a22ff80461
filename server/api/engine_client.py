"""The API's handle on the engine: prompt checks, admission control, per-request streams.

Routes never call the engine directly. They ask this client to `submit` prompts, which either
refuses at once (400 for a prompt that cannot fit, 429 when the queue is full) or hands back one
`RequestStream` per prompt. A stream releases its admission slot when it ends or is closed, and
closing it early aborts the engine request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from server.api.errors import APIError, bad_request
from server.api.metrics import ServerMetrics
from server.engine.async_engine import EngineDeadError
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


@dataclass
class Prompt:
    """A prompt as the engine gets it (token ids), with its text when the client sent text."""

    token_ids: list[int]
    text: str | None = None


class EngineClient:
    def __init__(self, engine, metrics: ServerMetrics, max_num_seqs: int, max_waiting_requests: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self._metrics = metrics
        self._max_num_seqs = max_num_seqs
        self._max_waiting = max_waiting_requests
        self._in_flight = 0  # admitted here and not finished; counted before the engine sees them

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished or closed."""
        return self._in_flight

    # ------------------------------------------------------------ prompts

    def encode(self, text: str) -> Prompt:
        return Prompt(self.tokenizer(text, verbose=False).input_ids, text)

    def from_token_ids(self, token_ids: list[int]) -> Prompt:
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in token_ids):
            raise bad_request(f"prompt: token ids must be in [0, {vocab})", "prompt")
        return Prompt(list(token_ids))

    def check_fits(self, prompt: Prompt, max_tokens: int) -> None:
        """Refuse what the engine would refuse, before anything is streamed back."""
        if not prompt.token_ids:
            raise bad_request("prompt: must not be empty", "prompt")
        total = len(prompt.token_ids) + max_tokens
        if total > self.max_model_len:
            raise bad_request(
                f"prompt ({len(prompt.token_ids)} tokens) + max_tokens ({max_tokens}) = {total} tokens exceeds "
                f"the model's context length of {self.max_model_len}", "max_tokens")

    # ------------------------------------------------------------ requests

    def submit(self, prompts: Sequence[Prompt], params: SamplingParams, request_id: str) -> list[RequestStream]:
        """Admit all prompts or none; each is its own engine request (`request_id`, or `request_id-i`)."""
        for prompt in prompts:
            self.check_fits(prompt, params.max_tokens)
        self._admit(len(prompts))
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        return [RequestStream(rid, prompt, self._run(rid, prompt, params), release=self._release)
                for rid, prompt in zip(ids, prompts)]

    def _admit(self, count: int) -> None:
        # The engine's waiting count lags (it is updated by the engine thread), so also count what
        # this process has admitted beyond the running slots. Both are estimates of the same queue.
        waiting = max(self.engine.stats().num_waiting, self._in_flight - self._max_num_seqs, 0)
        if waiting + count > self._max_waiting:
            raise APIError(429, f"server overloaded: {waiting} requests waiting (max_waiting_requests="
                                f"{self._max_waiting}); retry later", headers={"Retry-After": RETRY_AFTER_S})
        self._in_flight += count

    def _release(self) -> None:
        self._in_flight -= 1

    async def _run(self, request_id: str, prompt: Prompt,
                   params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        tracker = self._metrics.track()
        try:
            # aclosing: when we are closed early, close the engine's generator now (which aborts the
            # request and frees its blocks) rather than whenever it is garbage-collected.
            async with aclosing(self.engine.generate(prompt.token_ids, params, request_id)) as outputs:
                async for out in outputs:
                    tracker.on_output(out)
                    yield out
        except ValueError as exc:  # the engine's own prompt checks; ours should have caught these
            raise bad_request(str(exc)) from None
        except EngineDeadError as exc:
            raise APIError(503, f"engine is not running: {exc}") from None
        except Exception as exc:  # fail this request alone, with the reason; the engine serves on
            logger.exception("request %s failed", request_id)
            raise APIError(500, f"request failed: {type(exc).__name__}: {exc}") from None
        finally:
            tracker.on_closed()


class RequestStream:
    """The outputs of one engine request. Iterate it, and `aclose()` it when done (idempotent)."""

    def __init__(self, request_id: str, prompt: Prompt, outputs: AsyncGenerator[RequestOutput, None],
                 release: Callable[[], None]):
        self.request_id = request_id
        self.prompt = prompt
        self._outputs = outputs
        self._release_slot: Callable[[], None] | None = release  # the admission slot, given back once

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self._outputs.__anext__()
        except BaseException:
            self._release()
            raise
        if out.finished:
            self._release()
        return out

    async def final(self) -> RequestOutput:
        """Run to the end and return the last output."""
        last = None
        async for out in self:
            last = out
        if last is None:
            raise RuntimeError(f"the engine ended request {self.request_id} without any output")
        return last

    async def aclose(self) -> None:
        await self._outputs.aclose()  # aborts the engine request if it is still running
        self._release()

    def _release(self) -> None:
        if self._release_slot is not None:
            self._release_slot()
            self._release_slot = None


async def final_outputs(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """The last output of every stream. If one raises, the others are cancelled (so aborted) first:
    a bare gather would leave them running while the caller closes them."""
    tasks = [asyncio.ensure_future(stream.final()) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        await stream.aclose()


def new_request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def make_sampling_params(**fields) -> SamplingParams:
    """SamplingParams from request fields; its ValueError (which names the field first) becomes a 400."""
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        message = str(exc)
        raise bad_request(message, message.split(" ", 1)[0]) from None


def raise_if_failed(out: RequestOutput) -> RequestOutput:
    """An engine-side failure of one request is that request's 500; other requests carry on."""
    if out.finish_reason == "error":
        raise APIError(500, f"request failed in the engine: {out.error or 'unknown error'}")
    return out
