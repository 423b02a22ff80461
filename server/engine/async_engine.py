"""The engine behind the API server: the engine core runs in one background thread; coroutines add
requests, stream their outputs through per-request asyncio queues, and abort them."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from kvsplice.model_source import served_name
from server.engine import faults
from server.engine.config import EngineConfig
from server.engine.llm_engine import EngineStats, LLMEngine
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.stats_log import StatsLogger

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_name = served_name(config.model)
        self.max_model_len = self.engine.max_model_len
        # The engine's admission rules read only what is fixed at start-up: safe from any thread.
        self.check_token_ids = self.engine.check_token_ids
        self.check_fits = self.engine.check_fits
        self.check_params = self.engine.check_params
        self._commands: queue.Queue = queue.Queue()  # (kind, payload) from the event loop to the thread
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.engine.stats()
        self._stats_log = StatsLogger()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._crashed: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kvsplice-engine", daemon=True)
        self._thread.start()
        if self.engine.core.workers is not None:
            self.engine.core.workers.on_failure(self._workers_failed)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():  # a loop stuck in a collective keeps its ranks
            self.engine.shutdown()

    def _workers_failed(self, reason: str) -> None:
        """Another rank died (the watcher thread calls this): the engine loop may be blocked in a
        collective that will never complete, so fail every request from here; the server sees the
        engine dead and exits."""
        self._crashed = RuntimeError(reason)
        for request_id in list(self._streams):
            self._deliver_error(request_id, EngineDeadError(f"engine stopped: {reason}"))

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._crashed is None

    @property
    def death(self) -> str | None:
        """Why the engine loop stopped, once it has died (None while alive or before start)."""
        if self._crashed is not None:
            return f"{type(self._crashed).__name__}: {self._crashed}"
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "the engine thread exited"
        return None

    def stats(self) -> EngineStats:
        return self._stats

    # -- requests ---------------------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced; the last one has finished=True.
        Leaving the loop early (client gone, cancellation) aborts the request and frees its blocks."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._commands.put(("add", (request_id, prompt, params)))
        finished = False
        try:
            # A refusal (ValueError from validation) or the engine's death arrives on the stream like
            # an output: one queue to wait on, so nothing can leave this request waiting forever.
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def cancel(self, request_id: str, error: BaseException) -> None:
        """End a request's stream with `error` at once, whatever the engine is busy with, and abort
        it in the engine. Call from the event loop that iterates the stream."""
        entry = self._streams.get(request_id)
        if entry is not None:
            entry[1].put_nowait(error)
        self.abort(request_id)

    # -- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not self.engine.has_unfinished())
                outputs = self.engine.step()
                self._stats = self.engine.stats()  # before delivery: a client that saw its tokens sees them counted
                self._deliver_step(outputs)
                self._stats_log.maybe_log(self._stats)
        except BaseException as exc:  # noqa: BLE001 - report to every waiting request, then die
            log.exception("engine loop crashed")
            self._crashed = exc
            for request_id in list(self._streams):
                self._deliver_error(request_id, EngineDeadError(f"engine loop crashed: {exc}"))
        finally:
            for request_id in list(self.engine.core.seqs):
                out = self.engine.abort(request_id)
                if out is not None:
                    self._deliver(out)
            self._stats = self.engine.stats()

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, payload) -> None:
        if kind == "abort":
            out = self.engine.abort(payload)
            if out is not None:
                self._deliver(out)
            return
        request_id, prompt, params = payload
        faults.check("loop", params.seed)  # outside the guard below: a test's way to kill the loop
        try:
            self.engine.add_request(request_id, prompt, params)
        except ValueError as exc:
            self._deliver_error(request_id, exc)
        except Exception as exc:  # noqa: BLE001 - add_request queues nothing when it fails: refuse this one alone
            log.warning("request %s could not be added: %s: %s", request_id, type(exc).__name__, exc)
            self._deliver_error(request_id, exc)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, one wake-up of each event loop for all of them: at a batch of 150
        streams, a `call_soon_threadsafe` per output cost the loop (and the GIL) a wake-up each."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                batches.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, error)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)
