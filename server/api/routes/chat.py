"""POST /v1/chat/completions: the tokenizer's chat template, then one engine request per choice (n)."""
from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial

from fastapi import APIRouter, Request

from server.api.body import CheckedRoute
from server.api.context import Context, ServerContext
from server.api.disconnect import run_unless_disconnected
from server.api.engine_client import (RequestStream, close_all, final_outputs, make_sampling_params, new_request_id,
                                      raise_if_failed)
from server.api.logprobs import chat_logprobs
from server.api.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatLogprobs, Usage)
from server.api.streaming import SSE_DONE, EventStreamResponse, merge, sse, sse_error
from server.engine.outputs import RequestOutput

router = APIRouter(route_class=CheckedRoute)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, ctx: Context):
    ctx.check_model(body.model)
    prompt = await ctx.client.render_chat(body.messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:  # OpenAI's default: as much as the context leaves
        max_tokens = max(ctx.client.max_model_len - len(prompt.token_ids), 1)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None  # None: no logprobs at all
    params = make_sampling_params(max_tokens=max_tokens, logprobs=top_logprobs, **body.sampling_fields())
    request_id = new_request_id("chatcmpl")
    streams = ctx.client.submit([prompt], params, request_id, copies=body.n)

    if body.stream:
        events = _events(ctx, request_id, streams, top_logprobs, body.include_usage)
        return EventStreamResponse(events, on_close=partial(close_all, streams))
    try:
        outputs = [raise_if_failed(out) for out in await run_unless_disconnected(request, final_outputs(streams))]
    finally:
        await close_all(streams)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=out.text),
                          logprobs=_logprobs(ctx, out, 0, top_logprobs), finish_reason=out.finish_reason)
               for i, out in enumerate(outputs)]
    return ChatCompletionResponse(id=request_id, model=ctx.model_name, choices=choices, usage=_usage(outputs))


def _usage(outputs: list[RequestOutput]) -> Usage:
    """The prompt once (every choice shares it), every choice's generated tokens."""
    return Usage.of(len(outputs[0].prompt_token_ids), sum(len(out.token_ids) for out in outputs))


def _logprobs(ctx: ServerContext, out: RequestOutput, start: int, top_logprobs: int | None) -> ChatLogprobs | None:
    """Log-probabilities of the tokens generated from position `start` on, if they were asked for."""
    if top_logprobs is None:
        return None
    return chat_logprobs(ctx.token_text, (out.logprobs or [])[start:len(out.token_ids)], top_logprobs)


async def _events(ctx: ServerContext, request_id: str, streams: list[RequestStream], top_logprobs: int | None,
                  include_usage: bool) -> AsyncGenerator[str, None]:
    def chunk(index: int, delta: ChatDelta, **fields) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, **fields)
        return sse(ChatCompletionChunk(id=request_id, model=ctx.model_name, choices=[choice]))

    try:
        for index in range(len(streams)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        sent_tokens = [0] * len(streams)
        finished: dict[int, RequestOutput] = {}
        async for index, out in merge(streams):
            raise_if_failed(out)
            if out.delta_text or out.finished:
                yield chunk(index, ChatDelta(content=out.delta_text),
                            logprobs=_logprobs(ctx, out, sent_tokens[index], top_logprobs),
                            finish_reason=out.finish_reason if out.finished else None)
                sent_tokens[index] = len(out.token_ids)
            if out.finished:
                finished[index] = out
        if include_usage and finished:
            usage = _usage([finished[i] for i in sorted(finished)])
            yield sse(ChatCompletionChunk(id=request_id, model=ctx.model_name, choices=[], usage=usage))
    except Exception as exc:
        yield sse_error(exc)
    yield SSE_DONE
