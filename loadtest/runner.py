"""One load run against one server: closed loop (N in flight) or open loop (Poisson / gamma arrivals).

Every run is bounded by a request count and a duration. It ends early, keeping what it measured,
when the server goes away or keeps failing, or when `stop_when` (the capacity search) says so.
"""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from loadtest.client import SUSPICIOUS_KINDS, RequestResult
from loadtest.server_metrics import MetricsPoller, MetricsSnapshot
from loadtest.target import Target
from loadtest.workload import Workload

StopRule = Callable[["RunResult", MetricsSnapshot], "str | None"]  # a reason to end the run now, or None
IDLE_TIMEOUT_S = 60.0  # how long to wait for a busy server (a previous run's tail) before starting


class ServerFailed(RuntimeError):
    """The server went away or failed request after request; the run that saw it is kept."""


@dataclass(frozen=True)
class Limits:
    max_requests: int = 500
    duration_s: float = 300.0
    grace_s: float = 30.0  # after duration_s no new requests; in-flight ones get this long to finish
    max_consecutive_failures: int = 20  # 429s excluded: refusing load is an answer, not a failure


@dataclass(frozen=True)
class Load:
    """How requests are paced: `concurrency` in flight at all times, or arrivals at `rate` per second."""

    concurrency: int | None = None
    rate: float | None = None  # math.inf: all at once
    burstiness: float = 1.0  # gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier
    max_concurrency: int | None = None  # open loop only: cap on requests in flight
    seed: int = 0

    @property
    def mode(self) -> str:
        return "concurrency" if self.concurrency is not None else "rate"

    @property
    def value(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.rate)

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        return "rate inf" if math.isinf(self.rate) else f"rate {self.rate:g}/s"


@dataclass
class RunResult:
    server: str
    label: str
    mode: str
    value: float
    phase: str = "run"  # run | search | confirm
    start_s: float = 0.0  # session clock: first request sent
    end_s: float = 0.0  # last request ended
    stop_reason: str = "running"
    aborted: str | None = None  # why it ended early, if it did
    server_failed: bool = False
    requests: list[RequestResult] = field(default_factory=list)
    samples: list[MetricsSnapshot] = field(default_factory=list)
    before: MetricsSnapshot | None = None
    after: MetricsSnapshot | None = None
    peak_in_flight: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return max(self.end_s - self.start_s, 0.0)


async def run_load(target: Target, workload: Workload, load: Load, limits: Limits, *, clock0: float,
                   phase: str = "run", poll_interval_s: float = 0.5,
                   stop_when: StopRule | None = None,
                   on_start: Callable[[RunResult], None] | None = None, progress: bool = True) -> RunResult:
    """Run one load; raises ServerFailed (after recording the run) if the server failed under it."""
    run = RunResult(target.label, load.label, load.mode, load.value, phase)
    if on_start is not None:
        on_start(run)  # from now on a crash or Ctrl-C still finds this run in the results
    run.before = await _settled_snapshot(target, run)
    driver = _Driver(run, target, workload, load, limits, clock0, progress)
    poller = None
    if target.has_metrics and not run.server_failed:
        poller = MetricsPoller(target.metrics, poll_interval_s, run.samples,  # filled in place: saved as it grows
                               on_sample=lambda s: driver.on_sample(s, stop_when),
                               on_failure=driver.on_metrics_failure)
        poller.start()
    try:
        if not run.server_failed:
            await driver.go()
    finally:
        if poller is not None:
            await poller.stop()
        driver.close()
    if not run.server_failed:
        run.after = await _settled_snapshot(target, run)
    if run.server_failed:
        raise ServerFailed(f"{target.label} ({target.url}): {run.aborted}")
    return run


async def _settled_snapshot(target: Target, run: RunResult) -> MetricsSnapshot | None:
    """A snapshot of an idle server, so counter deltas cover this run's requests and nothing else."""
    if not target.has_metrics:
        return None
    try:
        snapshot = await target.metrics.wait_idle(IDLE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to scrape: ask /health whether the server is there
        problem = await target.health_problem()
        if problem:
            run.aborted, run.server_failed = f"server gone: {problem}", True
        else:
            run.notes.append(f"/metrics failed ({type(exc).__name__}); no server-side numbers for this run")
        return None
    if snapshot is None:
        run.notes.append(f"server not idle within {IDLE_TIMEOUT_S:.0f}s: its counters include other traffic")
        snapshot = await target.metrics.scrape()
    return snapshot


class _Driver:
    def __init__(self, run: RunResult, target: Target, workload: Workload, load: Load, limits: Limits,
                 clock0: float, progress: bool):
        self.run, self.target, self.workload, self.load, self.limits = run, target, workload, load, limits
        self._clock0 = clock0
        self._tasks: set[asyncio.Task] = set()
        self._no_more = asyncio.Event()  # set: issue no new requests
        self._issued = 0
        self._in_flight = 0
        self._consecutive_failures = 0
        self._cancel_reason = "cancelled"
        self._deadline_hit = False
        self._bar = tqdm(total=limits.max_requests, desc=f"{target.label} {load.label}", unit="req",
                         file=sys.stderr, disable=not progress, dynamic_ncols=True, leave=False)

    # ------------------------------------------------------------ the run

    async def go(self) -> None:
        self.run.start_s = self._now()
        deadline = asyncio.create_task(self._deadline())
        try:
            if self.load.concurrency is not None:
                await self._closed_loop(self.load.concurrency)
            else:
                await self._open_loop()
        finally:
            deadline.cancel()
            await self._cancel_in_flight(self._cancel_reason)
            await asyncio.gather(deadline, return_exceptions=True)
            self.run.end_s = self._now()
            self.run.stop_reason = self._stop_reason()

    def close(self) -> None:
        self._bar.close()

    async def _closed_loop(self, concurrency: int) -> None:
        async def worker() -> None:
            while (index := self._next_index()) is not None:
                await self._one(index)

        workers = [self._spawn(worker()) for _ in range(concurrency)]
        await asyncio.gather(*workers, return_exceptions=True)

    async def _open_loop(self) -> None:
        rng = random.Random(f"arrivals:{self.load.seed}")
        slots = asyncio.Semaphore(self.load.max_concurrency) if self.load.max_concurrency else None
        while (index := self._next_index()) is not None:
            if slots is not None:
                await slots.acquire()
            self._spawn(self._one(index, slots))
            gap = self._gap(rng)
            if gap > 0:
                try:  # sleep until the next arrival, unless told to stop first
                    await asyncio.wait_for(self._no_more.wait(), gap)
                except asyncio.TimeoutError:
                    pass
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _gap(self, rng: random.Random) -> float:
        """Seconds to the next arrival: gamma with mean 1/rate; shape 1 is the exponential (Poisson)."""
        if math.isinf(self.load.rate):
            return 0.0
        shape = self.load.burstiness
        return rng.gammavariate(shape, 1.0 / (self.load.rate * shape))

    async def _deadline(self) -> None:
        await asyncio.sleep(self.limits.duration_s)
        self._deadline_hit = True
        self._no_more.set()
        await asyncio.sleep(self.limits.grace_s)
        self._cancel_reason = f"still running {self.limits.grace_s:g}s after the {self.limits.duration_s:g}s limit"
        await self._cancel_in_flight(self._cancel_reason)

    def _next_index(self) -> int | None:
        if self._no_more.is_set() or self._issued >= self.limits.max_requests:
            return None
        self._issued += 1
        return self._issued - 1

    async def _one(self, index: int, slots: asyncio.Semaphore | None = None) -> None:
        spec = self.workload.request(index)
        result = self.target.client.new_result(spec)
        self.run.requests.append(result)
        self._in_flight += 1
        self.run.peak_in_flight = max(self.run.peak_in_flight, self._in_flight)
        try:
            await self.target.client.complete(spec, result)
        except asyncio.CancelledError:
            result.fail("cancelled", self._cancel_reason)
            raise
        finally:
            self._in_flight -= 1
            if slots is not None:
                slots.release()
            self._bar.update(1)
        await self._after(result)

    async def _after(self, result: RequestResult) -> None:
        """Watch failures: a vanished server ends the run at once, a failing one after a streak."""
        if result.ok:
            self._consecutive_failures = 0
            return
        if result.error_kind != "HTTP 429":
            self._consecutive_failures += 1
        if result.error_kind in SUSPICIOUS_KINDS:
            problem = await self.target.health_problem()
            if problem:
                await self.abort(f"server gone: {problem}", server_failed=True)
                return
        if self._consecutive_failures >= self.limits.max_consecutive_failures:
            await self.abort(f"{self._consecutive_failures} requests failed in a row; last: "
                             f"{result.error_kind}: {result.error}", server_failed=True)

    # ------------------------------------------------------------ stopping

    async def abort(self, reason: str, server_failed: bool = False) -> None:
        if self.run.aborted is None:
            self.run.aborted, self.run.server_failed = reason, server_failed
            self._cancel_reason = f"run ended early: {reason}"
        self._no_more.set()
        await self._cancel_in_flight(self._cancel_reason)

    async def _cancel_in_flight(self, reason: str) -> None:
        self._cancel_reason = reason
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    def on_sample(self, snapshot: MetricsSnapshot, stop_when: StopRule | None) -> None:
        waiting = f" waiting={snapshot.waiting:.0f}" if snapshot.waiting else ""
        if snapshot.kv_usage is not None:
            self._bar.set_postfix_str(f"in flight={self._in_flight} kv={snapshot.kv_usage:.0%}{waiting}", refresh=False)
        reason = stop_when(self.run, snapshot) if stop_when is not None else None
        if reason is not None and self.run.aborted is None:
            self._spawn(self.abort(reason))

    def on_metrics_failure(self, message: str) -> None:
        async def check() -> None:
            problem = await self.target.health_problem()
            if problem:
                await self.abort(f"server gone: {problem}", server_failed=True)

        self._spawn(check())

    # ------------------------------------------------------------ helpers

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stop_reason(self) -> str:
        if self.run.aborted is not None:
            return "aborted"
        return "duration" if self._deadline_hit else "max_requests"

    def _now(self) -> float:
        return time.perf_counter() - self._clock0
