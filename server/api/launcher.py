"""`kvsplice serve`: build the engine, log what the cache holds, run uvicorn, drain on SIGTERM."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

from server.api.app import build_app
from server.api.context import ServerContext
from server.settings import Settings

logger = logging.getLogger("kvsplice.serve")

_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(settings: Settings) -> int:
    from server.engine.async_engine import AsyncLLMEngine  # heavy (torch): only when serving

    if settings.tensor_parallel_size != 1:
        logger.warning("tensor_parallel_size %d is recorded but not implemented yet: serving on one device",
                       settings.tensor_parallel_size)
    engine = AsyncLLMEngine(settings.engine_config())
    log_capacity(engine, settings)
    app = build_app(engine, settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
        timeout_graceful_shutdown=settings.drain_timeout_s, access_log=settings.log_level == "debug")
    server = DrainingServer(config, app.state.ctx)
    server.run()
    return 0 if server.started else 1  # not started: the port was taken or the app failed to start


def log_capacity(engine, settings: Settings) -> None:
    stats = engine.stats()
    model_name = settings.served_model_name or engine.model_name
    sequences = stats.kv_capacity_tokens / engine.max_model_len
    logger.info("model %s (%s), compression_ratio %g", model_name, settings.model, stats.compression_ratio)
    logger.info("KV cache: %d bytes per token, capacity %d tokens = %.1f sequences of max_model_len %d "
                "(%d blocks of %d tokens)", stats.kv_bytes_per_token, stats.kv_capacity_tokens, sequences,
                engine.max_model_len, stats.num_blocks_total, stats.block_size)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: a signal marks the app as draining, and a finished drain exits 0.

    On SIGTERM uvicorn stops listening, waits up to `timeout_graceful_shutdown` for open requests,
    then runs the lifespan shutdown (engine.shutdown()). Requests that still reach the app in
    that window (kept-alive connections) get 503 from the API gate.
    """

    def __init__(self, config: uvicorn.Config, ctx: ServerContext):
        super().__init__(config)
        self._ctx = ctx

    def handle_exit(self, sig: int, frame) -> None:
        if not self._ctx.draining:
            logger.info("signal %s: draining (up to %gs for in-flight requests)", signal.Signals(sig).name,
                        self.config.timeout_graceful_shutdown or 0)
        self._ctx.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's version re-raises the signal after shutting down, so the process would die of
        # SIGTERM (status 143) even after a clean drain. Ours restores the handlers and returns.
        if threading.current_thread() is not threading.main_thread():  # signals are main-thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _EXIT_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
