"""POST /v1/completions (OpenAI legacy completions), streaming or not.

`max_tokens: 0` with `echo` is how log-likelihood is scored (lm-evaluation-harness): the engine
always generates at least one token, so we ask for one and leave it out of the answer.

`n` and `best_of`: every prompt is submitted max(n, best_of) times, each copy its own engine request
(the copies share the prompt's cached blocks through the prefix cache); choice i*n + j is prompt
i's j-th. With best_of > n the n copies with the highest cumulative log-probability are returned.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial

from fastapi import APIRouter, Request

from server.api.body import CheckedRoute
from server.api.context import Context, ServerContext
from server.api.disconnect import run_unless_disconnected
from server.api.engine_client import (Prompt, RequestStream, close_all, final_outputs, make_sampling_params,
                                      new_request_id, raise_if_failed)
from server.api.errors import bad_request
from server.api.logprobs import TokenText, completion_logprobs, join, text_width
from server.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from server.api.streaming import SSE_DONE, EventStreamResponse, merge, sse, sse_error
from server.engine.outputs import RequestOutput

router = APIRouter(route_class=CheckedRoute)


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request, ctx: Context):
    ctx.check_model(body.model)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens < 0:
        raise bad_request("max_tokens: must be >= 0", "max_tokens")
    copies = body.num_sequences
    # Ranking best_of needs each chosen token's log-probability, asked for even when not returned.
    logprobs = body.logprobs if body.logprobs is not None or copies == body.n else 0
    params = make_sampling_params(
        max_tokens=max(max_tokens, 1), logprobs=logprobs, prompt_logprobs=body.logprobs if body.echo else None,
        **body.sampling_fields())
    prompts = await _prompts(ctx, body.prompt)  # after the cheap checks: tokenizing is the costly one
    request_id = new_request_id("cmpl")
    streams = ctx.client.submit(prompts, params, request_id, copies=copies)
    shape = _Shape(echo=body.echo, logprobs=body.logprobs is not None, hide_generated=max_tokens == 0)

    if body.stream:
        events = _events(ctx, request_id, streams, shape, body.include_usage, copies)
        return EventStreamResponse(events, on_close=partial(close_all, streams))
    try:
        outputs = await run_unless_disconnected(request, final_outputs(streams))
    finally:
        await close_all(streams)
    choices, usage = [], Usage.of(0, 0)
    for i, out in enumerate(outputs):
        raise_if_failed(out)
        usage = _add_usage(usage, out, shape, first_copy=i % copies == 0)
    for p in range(len(prompts)):
        group = list(zip(streams, outputs))[p * copies:(p + 1) * copies]
        for j, (stream, out) in enumerate(_best(group, body.n)):
            text, choice_logprobs = _ChoiceWriter(stream.prompt, shape, ctx).advance(out)
            choices.append(CompletionChoice(index=p * body.n + j, text=text, logprobs=choice_logprobs,
                                            finish_reason=out.finish_reason))
    return CompletionResponse(id=request_id, model=ctx.model_name, choices=choices, usage=usage)


def _best(group: list[tuple[RequestStream, RequestOutput]], n: int) -> list[tuple[RequestStream, RequestOutput]]:
    """The n copies with the highest cumulative log-probability, in their original order."""
    if len(group) == n:
        return group
    scores = [sum(r.logprob for r in (out.logprobs or []) if r is not None) for _, out in group]
    keep = set(sorted(range(len(group)), key=scores.__getitem__, reverse=True)[:n])
    return [item for k, item in enumerate(group) if k in keep]


async def _prompts(ctx: ServerContext, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        return await ctx.client.encode([prompt])
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [ctx.client.from_token_ids(prompt)]
    if isinstance(prompt[0], str):
        return await ctx.client.encode(prompt)
    ctx.client.check_count(len(prompt))
    return [ctx.client.from_token_ids(ids) for ids in prompt]


@dataclass(frozen=True)
class _Shape:
    echo: bool
    logprobs: bool
    hide_generated: bool  # max_tokens 0: the one token generated is not part of the answer


def _add_usage(usage: Usage, out: RequestOutput, shape: _Shape, first_copy: bool = True) -> Usage:
    """A prompt's tokens count once however many copies it has; every copy's generated tokens count."""
    generated = 0 if shape.hide_generated else len(out.token_ids)
    prompt = len(out.prompt_token_ids) if first_copy else 0
    return Usage.of(usage.prompt_tokens + prompt, usage.completion_tokens + generated)


class _ChoiceWriter:
    """Turns one request's outputs into choice text and logprobs, returning only what is new.

    Fed every output it builds stream chunks; fed just the last one it builds the whole choice.
    """

    def __init__(self, prompt: Prompt, shape: _Shape, ctx: ServerContext):
        self._prompt = prompt
        self._shape = shape
        self._token_text: TokenText = ctx.token_text
        self._tokenizer = ctx.client.tokenizer
        self._echo_pending = shape.echo
        self._chars_sent = 0
        self._tokens_sent = 0
        self._offset = 0  # text_offset of the next token

    def advance(self, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        text, logprobs = "", CompletionLogprobs() if self._shape.logprobs else None
        if self._echo_pending:
            self._echo_pending = False
            text += self._prompt_text(out)
            if logprobs is not None:
                entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                logprobs = join(logprobs, self._logprobs(out.prompt_token_ids, entries))
        if not self._shape.hide_generated:
            text += out.text[self._chars_sent:]
            self._chars_sent = len(out.text)
            new_ids = out.token_ids[self._tokens_sent:]
            if logprobs is not None:
                entries = (out.logprobs or [])[self._tokens_sent:len(out.token_ids)]
                logprobs = join(logprobs, self._logprobs(new_ids, entries))
            self._tokens_sent = len(out.token_ids)
        return text, logprobs

    def _prompt_text(self, out: RequestOutput) -> str:
        if self._prompt.text is not None:
            return self._prompt.text
        return self._tokenizer.decode(out.prompt_token_ids, skip_special_tokens=True)

    def _logprobs(self, token_ids, entries) -> CompletionLogprobs:
        result = completion_logprobs(self._token_text, token_ids, entries, self._offset)
        self._offset += text_width(self._token_text, token_ids)
        return result


async def _events(ctx: ServerContext, request_id: str, streams: list[RequestStream], shape: _Shape,
                  include_usage: bool, copies: int = 1) -> AsyncGenerator[str, None]:
    writers = [_ChoiceWriter(s.prompt, shape, ctx) for s in streams]
    usage = Usage.of(0, 0)
    try:
        async for index, out in merge(streams):
            raise_if_failed(out)
            text, logprobs = writers[index].advance(out)
            if not text and not out.finished and not (logprobs and logprobs.tokens):
                continue
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                      finish_reason=out.finish_reason if out.finished else None)
            yield sse(CompletionResponse(id=request_id, model=ctx.model_name, choices=[choice]))
            if out.finished:
                usage = _add_usage(usage, out, shape, first_copy=index % copies == 0)
        if include_usage:
            yield sse(CompletionResponse(id=request_id, model=ctx.model_name, choices=[], usage=usage))
    except Exception as exc:
        yield sse_error(exc)
    yield SSE_DONE
