"""`kvsplice serve`: build the engine, log what the cache holds, run uvicorn, drain on SIGTERM.

Exit status: 0 after a clean drain, 1 when the server could not start listening (port taken),
3 when the drain timeout cut requests off, 4 when the engine loop died (so that a supervisor
restarts the process instead of leaving it up and failing every request). The CLI adds 2 for
settings and models that cannot be served.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

from kvsplice.model_source import check_available, load_config, position_limit, shipped_config_name
from server.api.app import build_app
from server.api.context import ServerContext
from server.api.limits import HeaderTimeoutH11Protocol
from server.settings import Settings

logger = logging.getLogger("kvsplice.serve")

_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_NOT_STARTED = 1
EXIT_DRAIN_INCOMPLETE = 3
EXIT_ENGINE_DIED = 4
# uvicorn's own cancellation comes this long after drain_timeout_s: the server's cut (an error
# event or a 503 for every request still running) goes first and has this long to be written.
DRAIN_GRACE_S = 5.0


class StartupError(ValueError):
    """A setting that this model cannot be served with; the message names it and the fix."""


def serve(settings: Settings) -> int:
    if not (settings.load_format == "dummy" and shipped_config_name(settings.model)):
        check_available(settings.model)  # before torch is imported: a missing model fails in a second
    from server.parallel.rendezvous import check_world_size, torchrun_rank

    place = torchrun_rank()
    if place is not None:
        check_world_size(place, settings.tensor_parallel_size)
        if place.rank != 0:
            return serve_torchrun_worker(settings, place)
    from server.engine.async_engine import AsyncLLMEngine  # heavy (torch): only when serving

    check_max_model_len(settings)
    warn_if_open(settings)
    engine = AsyncLLMEngine(settings.engine_config())
    log_capacity(engine, settings)
    app = build_app(engine, settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
        timeout_graceful_shutdown=settings.drain_timeout_s + DRAIN_GRACE_S,
        access_log=settings.log_level == "debug",
        # h11 (not httptools) for its 16 KiB header limit, with a deadline on the headers as well.
        http=functools.partial(HeaderTimeoutH11Protocol, header_timeout_s=settings.request_header_timeout_s))
    server = DrainingServer(config, app.state.ctx)
    server.run()
    return server.exit_status()


def serve_torchrun_worker(settings: Settings, place) -> int:
    """A torchrun rank other than 0: no HTTP, it runs its shard of every step rank 0 schedules."""
    from server.parallel.worker import run_torchrun

    logger.info("torchrun rank %d of %d: following rank 0", place.rank, place.world_size)
    return run_torchrun(settings.engine_config(), place, logging.getLogger().level)


def check_max_model_len(settings: Settings) -> None:
    """Refuse a max_model_len beyond the model's positions before a cache is sized for it."""
    if settings.max_model_len is None:
        return  # the engine takes the model's own limit
    limit, where = position_limit(load_config(settings.model, settings.trust_remote_code))
    if settings.max_model_len > limit:
        raise StartupError(f"max_model_len: {settings.max_model_len} is more than the model's {limit} positions "
                           f"({where}); set it to at most {limit}")


def warn_if_open(settings: Settings) -> None:
    if settings.api_key is None and not _is_loopback(settings.host):
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                       "(set api_key / KVSPLICE_API_KEY to require one)", settings.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def log_capacity(engine, settings: Settings) -> None:
    stats = engine.stats()
    model_name = (settings.served_model_name or [engine.model_name])[0]
    sequences = stats.kv_capacity_tokens / engine.max_model_len
    logger.info("model %s (%s), compression_ratio %g, kv_cache_dtype %s", model_name, settings.model,
                stats.compression_ratio, stats.kv_cache_dtype)
    logger.info("KV cache: %d bytes per token, capacity %d tokens = %.1f sequences of max_model_len %d "
                "(%d blocks of %d tokens)", stats.kv_bytes_per_token, stats.kv_capacity_tokens, sequences,
                engine.max_model_len, stats.num_blocks_total, stats.block_size)
    if settings.tensor_parallel_size > 1:
        logger.info("tensor_parallel_size %d%s x pipeline_parallel_size %d: rank 0 holds %.2f GB of weights; every "
                    "rank holds the whole latent cache above (MLA's latent is read by all heads)",
                    settings.tensor_parallel_size, " (expert parallel)" if settings.enable_expert_parallel else "",
                    settings.pipeline_parallel_size, engine.engine.core.runner.weight_bytes / 1e9)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: a signal starts a drain that ends in time, and a dead engine ends the process.

    On SIGTERM uvicorn stops listening and waits for open requests. When drain_timeout_s runs out,
    every request still running is cut: a stream gets an error event and [DONE], a non-streaming
    request a 503, and the exit status says the drain was incomplete. Requests that still reach
    the app in that window (kept-alive connections) get 503 from the API gate. If the engine loop
    dies, the server shuts down and exits with EXIT_ENGINE_DIED.
    """

    def __init__(self, config: uvicorn.Config, ctx: ServerContext):
        super().__init__(config)
        self._ctx = ctx
        self._drain_timeout_s = max(0.0, (config.timeout_graceful_shutdown or DRAIN_GRACE_S) - DRAIN_GRACE_S)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self.engine_died = False

    def exit_status(self) -> int:
        if self.engine_died:
            return EXIT_ENGINE_DIED
        if not self.started:
            return EXIT_NOT_STARTED  # the port was taken or the app failed to start
        return EXIT_DRAIN_INCOMPLETE if self._ctx.cut_requests else 0

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.started and not self.should_exit and not self._ctx.engine.is_alive:
            logger.error("the engine loop died (%s): shutting down with exit status %d so that a supervisor "
                         "restarts the server", getattr(self._ctx.engine, "death", None) or "not running",
                         EXIT_ENGINE_DIED)
            self.engine_died = True
            self._ctx.draining = True  # what uvicorn still has to cancel is answered, not dropped
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame) -> None:
        if not self._ctx.draining:
            logger.info("signal %s: draining (up to %gs for in-flight requests)", signal.Signals(sig).name,
                        self._drain_timeout_s)
            if self._loop is not None:  # a signal handler runs between bytecodes: hand the timer to the loop
                self._loop.call_soon_threadsafe(self._arm_drain_timer)
        self._ctx.draining = True
        super().handle_exit(sig, frame)

    def _arm_drain_timer(self) -> None:
        if self._drain_timer is None:
            self._drain_timer = self._loop.call_later(self._drain_timeout_s, self._cut_in_flight)

    def _cut_in_flight(self) -> None:
        reason = f"server shut down before the request finished (drain_timeout_s={self._drain_timeout_s:g}s ran out)"
        requests, prompts = self._ctx.client.cut_all(reason)
        if requests:
            self._ctx.cut_requests += requests
            logger.warning("drain timeout (%gs) reached: cut %d in-flight request(s) (%d prompt(s)); they get an "
                           "error and the exit status will be %d", self._drain_timeout_s, requests, prompts,
                           EXIT_DRAIN_INCOMPLETE)

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
