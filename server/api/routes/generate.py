"""POST /generate: the project's own simple API (strict: unknown fields and wrong types are 400s)."""
from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial

from fastapi import APIRouter, Request

from server.api.body import CheckedRoute
from server.api.context import Context
from server.api.disconnect import run_unless_disconnected
from server.api.engine_client import (RequestStream, close_all, final_outputs, make_sampling_params, new_request_id,
                                      raise_if_failed)
from server.api.errors import bad_request
from server.api.protocol import GenerateChunk, GenerateRequest, GenerateResult, Usage
from server.api.streaming import SSE_DONE, EventStreamResponse, merge, sse, sse_error
from server.engine.outputs import RequestOutput

router = APIRouter(route_class=CheckedRoute)


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request, ctx: Context):
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise bad_request("prompt: must not be an empty list", "prompt")
    params = make_sampling_params(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        stop=body.stop or [], seed=body.seed, ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty)
    prompts = await ctx.client.encode(texts)
    streams = ctx.client.submit(prompts, params, new_request_id("gen"))

    if body.stream:
        return EventStreamResponse(_events(streams), on_close=partial(close_all, streams))
    try:
        outputs = await run_unless_disconnected(request, final_outputs(streams))
    finally:
        await close_all(streams)
    results = [_result(raise_if_failed(out)) for out in outputs]
    return results[0] if isinstance(body.prompt, str) else results


def _usage(out: RequestOutput) -> Usage:
    return Usage.of(len(out.prompt_token_ids), len(out.token_ids))


def _result(out: RequestOutput) -> GenerateResult:
    return GenerateResult(text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason, usage=_usage(out))


async def _events(streams: list[RequestStream]) -> AsyncGenerator[str, None]:
    try:
        async for index, out in merge(streams):
            raise_if_failed(out)
            yield sse(GenerateChunk(
                index=index, text=out.delta_text, token_ids=out.delta_token_ids,
                finish_reason=out.finish_reason if out.finished else None,
                usage=_usage(out) if out.finished else None))
    except Exception as exc:
        yield sse_error(exc)
    yield SSE_DONE
