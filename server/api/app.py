"""The FastAPI app: assembly only. Routes live in server/api/routes, engine access in engine_client."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.context import ServerContext
from server.api.engine_client import EngineClient
from server.api.errors import install_error_handlers
from server.api.limits import BodyLimitMiddleware
from server.api.logprobs import TokenText
from server.api.metrics import ServerMetrics
from server.api.middleware import APIGateMiddleware
from server.api.routes import chat, completions, generate, models, ops, tokenizer
from server.settings import Settings


def build_app(engine, settings: Settings) -> FastAPI:
    """An app serving `engine` (constructed, not yet started: the app's lifespan starts and stops it)."""
    names = settings.served_model_name or [engine.model_name]
    model_name = names[0]
    metrics = ServerMetrics(engine, model_name, log_requests=settings.enable_log_requests,
                            vllm_names=settings.vllm_metric_names)
    client = EngineClient(engine, metrics, settings.max_num_seqs, settings.max_waiting_requests)
    ctx = ServerContext(engine=engine, settings=settings, client=client, metrics=metrics,
                        model_name=model_name, model_names=tuple(names), token_text=TokenText(engine.tokenizer))

    app = FastAPI(title="kvsplice", summary="DeepSeek-V2 serving with a KVSplice-compressed MLA cache",
                  lifespan=_lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (generate, completions, chat, models, tokenizer, ops):
        app.include_router(module.router)
    # The last added runs first: the API key is checked before any of the body is read.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_request_body_bytes,
                       body_timeout_s=settings.request_body_timeout_s)
    app.add_middleware(APIGateMiddleware, ctx=ctx)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = app.state.ctx.engine
    engine.start()
    try:
        yield
    finally:
        # After uvicorn's drain: whatever is still running is aborted by the engine.
        await asyncio.to_thread(engine.shutdown)
