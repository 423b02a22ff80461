"""The API's handle on the engine: prompt checks, admission control, per-request streams.

Routes never call the engine directly. They ask this client to `encode` prompts (bounded in
length first, then tokenized on a worker thread so that a large prompt never stalls the event
loop) and to `submit` them, which either refuses at once (400 for a prompt that cannot fit, 429
when the queue is full) or hands back one `RequestStream` per prompt. A stream releases its
admission slot when it ends or is closed, and closing it early aborts the engine request, which
frees its KV blocks. `cut_all` ends every live stream with a 503 (the drain timeout).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from server.api.chat_template import render_chat
from server.api.errors import APIError, bad_request
from server.api.protocol import ChatMessage
from server.api.metrics import ServerMetrics
from server.engine.async_engine import EngineDeadError
from server.engine.llm_engine import PromptRejected
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
T = TypeVar("T")


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
        self._live: set[RequestStream] = set()
        self._cut_reason: str | None = None  # set by cut_all: no new request is taken after it
        # A text of more characters than this cannot fit in max_model_len tokens, since no token
        # stands for more characters than the longest one in the vocabulary: refused untokenized.
        self.max_prompt_chars = self.max_model_len * longest_token_chars(self.tokenizer)
        # One thread: tokenizing is CPU work that must not hold the event loop, and one caller at a
        # time keeps the tokenizer from being entered concurrently from several threads.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="kvsplice-tokenize")

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished or closed."""
        return self._in_flight

    # ------------------------------------------------------------ prompts

    async def encode(self, texts: Sequence[str]) -> list[Prompt]:
        """Text prompts -> token ids, after the checks that need no tokenizer."""
        self.check_count(len(texts))
        for text in texts:
            self._check_text(text)
        return await self._off_loop(self._encode_now, list(texts))

    async def render_chat(self, messages: list[ChatMessage]) -> Prompt:
        """Chat messages -> one prompt through the chat template, on the worker thread."""
        if len(messages) > self.max_model_len:  # every turn costs the template at least one token
            raise bad_request(f"messages: {len(messages)} messages cannot fit in the context length of "
                              f"{self.max_model_len} tokens", "messages")
        chars = sum(len(part) for m in messages for part in _texts(m))
        if chars > self.max_prompt_chars:
            raise bad_request(f"messages: {chars} characters of content cannot fit in the context length of "
                              f"{self.max_model_len} tokens", "messages")
        return Prompt(await self._off_loop(render_chat, self.tokenizer, messages))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text as the prompt paths make them (or without special tokens), for
        /tokenize; on the worker thread, with no length limit (counting is the point)."""
        def encode() -> list[int]:
            try:
                return self.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False).input_ids
            except Exception as exc:
                raise bad_request(f"prompt: could not be tokenized: {type(exc).__name__}: {exc}", "prompt") from None
        return await self._off_loop(encode) if text else []

    def _check_text(self, text: str) -> None:
        if not text:
            raise bad_request("prompt: must not be empty", "prompt")
        if len(text) > self.max_prompt_chars:
            raise bad_request(f"prompt: {len(text)} characters cannot fit in the context length of {self.max_model_len} "
                              f"tokens (at most {self.max_prompt_chars} characters could)", "prompt")

    def _encode_now(self, texts: list[str]) -> list[Prompt]:
        try:
            return [Prompt(self.tokenizer(text, verbose=False).input_ids, text) for text in texts]
        except Exception as exc:  # the tokenizer refusing a text is the client's 400, not our 500
            raise bad_request(f"prompt: could not be tokenized: {type(exc).__name__}: {exc}", "prompt") from None

    async def _off_loop(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, function, *args)

    def check_count(self, count: int) -> None:
        """A request with more prompts than the server ever holds at once is a 400: retrying cannot help."""
        capacity = self._max_num_seqs + self._max_waiting
        if count > capacity:
            raise bad_request(
                f"prompt: {count} prompts in one request are more than this server holds at once "
                f"(max_num_seqs {self._max_num_seqs} + max_waiting_requests {self._max_waiting}); "
                f"send at most {capacity} per request", "prompt")

    def from_token_ids(self, token_ids: list[int]) -> Prompt:
        with engine_rule():
            self.engine.check_token_ids(token_ids)
        return Prompt(list(token_ids))

    def check_fits(self, prompt: Prompt, max_tokens: int) -> None:
        """Refuse what the engine would refuse (its own rule), before anything is streamed back."""
        with engine_rule():
            self.engine.check_fits(len(prompt.token_ids), max_tokens)

    # ------------------------------------------------------------ requests

    def submit(self, prompts: Sequence[Prompt], params: SamplingParams, request_id: str,
               copies: int = 1) -> list[RequestStream]:
        """Admit all prompts or none; each prompt `copies` times (OpenAI's n), every copy its own
        engine request (`request_id`, or `request_id-i`), streams in prompt-major order. Copies of
        a seeded request get seeds seed, seed + 1, ...: one seed for all would draw the same text."""
        if self._cut_reason is not None:
            raise APIError(503, self._cut_reason)
        self.check_count(len(prompts) * copies)
        with engine_rule():
            self.engine.check_params(params)
        for prompt in prompts:
            self.check_fits(prompt, params.max_tokens)
        self._admit(len(prompts) * copies)
        jobs = [(prompt, params if params.seed is None or j == 0 else replace(params, seed=_offset_seed(params.seed, j)))
                for prompt in prompts for j in range(copies)]
        ids = [request_id] if len(jobs) == 1 else [f"{request_id}-{i}" for i in range(len(jobs))]
        streams = [RequestStream(rid, prompt, self._run(rid, prompt, job_params), release=self._release,
                                 cancel=self.engine.cancel, group=request_id)
                   for rid, (prompt, job_params) in zip(ids, jobs)]
        self._live.update(streams)
        return streams

    def _admit(self, count: int) -> None:
        # The engine's waiting count lags (it is updated by the engine thread), so also count what
        # this process has admitted beyond the running slots. Both are estimates of the same queue.
        # Every prompt counts: those that free running slots do not take go to the queue.
        waiting = max(self.engine.stats().num_waiting, self._in_flight - self._max_num_seqs, 0)
        free_slots = max(self._max_num_seqs - (self._in_flight - waiting), 0)
        would_wait = waiting + max(count - free_slots, 0)
        if would_wait > self._max_waiting:
            raise APIError(429, f"server overloaded: {waiting} requests waiting (max_waiting_requests="
                                f"{self._max_waiting}); retry later", headers={"Retry-After": RETRY_AFTER_S})
        self._in_flight += count

    def _release(self, stream: RequestStream) -> None:
        self._in_flight -= 1
        self._live.discard(stream)

    def cut_all(self, reason: str) -> tuple[int, int]:
        """End every live stream with APIError(503, reason) and refuse new ones; (HTTP requests, prompts) cut."""
        self._cut_reason = reason
        streams = list(self._live)
        for stream in streams:
            stream.cut(reason)
        return len({stream.group for stream in streams}), len(streams)

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
        except APIError:  # a cut (drain timeout): already the answer
            raise
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
                 release: Callable[[RequestStream], None],
                 cancel: Callable[[str, BaseException], None] | None = None, group: str | None = None):
        self.request_id = request_id
        self.group = group or request_id  # the HTTP request this prompt belongs to
        self.prompt = prompt
        self._outputs = outputs
        self._release_slot: Callable[[RequestStream], None] | None = release  # the admission slot, given back once
        self._cancel = cancel
        self._cut_reason: str | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._cut_reason is not None:
            self._release()
            raise APIError(503, self._cut_reason)
        try:
            out = await self._outputs.__anext__()
        except BaseException:
            self._release()
            raise
        if out.finished:
            self._release()
        return out

    def cut(self, reason: str) -> None:
        """End this stream with APIError(503, reason) now: whoever iterates it gets the error, and
        the engine request is aborted (which frees its blocks)."""
        self._cut_reason = reason
        if self._cancel is not None:
            self._cancel(self.request_id, APIError(503, reason))

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
            self._release_slot(self)
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


@contextmanager
def engine_rule() -> Iterator[None]:
    """The engine's refusal of a request, as the 400 that names the field."""
    try:
        yield
    except PromptRejected as exc:
        raise bad_request(str(exc), exc.param) from None


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry: an upper bound on the text one token stands for
    (byte-level entries have one character per byte, and a byte is at most one character)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def _texts(message: ChatMessage) -> list[str]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [message.content]
    return [part.text or "" for part in message.content]


def new_request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def _offset_seed(seed: int, offset: int) -> int:
    """seed + offset, wrapped into the signed 64-bit range the generators take."""
    return (seed + offset + 2**63) % 2**64 - 2**63


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
