"""Capacity: the largest concurrency a server *sustains*, found by doubling, then bisection, then
confirmed by a longer steady run.

A closed-loop run at concurrency N (N requests in flight, `waves` x N requests in all) is
*sustained* when:
  1. every request completed (none failed, none cut off by the trial's time limit);
  2. the server preempted nothing (kvsplice:num_preemptions_total did not rise);
  3. nothing queued: the server ran all N requests at once. This is read from the server's own
     high-water mark, kvsplice:num_requests_running_peak, in the snapshot taken once the trial has
     drained (the most requests running in one engine step since the trial's requests arrived at
     an idle server): no sample can miss it, however short the requests and however busy the
     machine. A request that cannot get KV blocks (or a sequence slot) waits instead, and the peak
     stays below N. The requests must still overlap at the server: one that lasts only a couple
     of engine steps can end before the client has delivered the last of N, and the search then
     understates the capacity (it never overstates it). On a 2-core CPU machine with a tiny model,
     2-token requests missed N = 20 at once in most bursts; 8- and 16-token ones never did, with
     or without a CPU-burning process beside them. A server without the series (vLLM) is judged
     on the peak of num_requests_running sampled every 0.1 s by default, with a note in the run's
     summary: those samples can miss a peak that lasts less than the interval;
  4. the run's TTFT, TPOT and ITL quantiles (p90 by default) are within the SLOs that were given.
Why not "kvsplice:num_requests_waiting stayed 0": that gauge also counts requests that arrived
while a step was running and join the batch at the next step, a one-step queue that every
continuous-batching server has; it is reported, not judged. To measure what the KV cache holds,
start the server with max_num_seqs above it. With requests of identical length started together,
all N reach their largest KV footprint at the same time in every wave, so one wave already
decides 2 and 3.
A trial that preempts is stopped at the first /metrics sample that shows it, so those trials are short.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loadtest.runner import Limits, Load, RunResult, run_load
from loadtest.server_metrics import MetricsSnapshot
from loadtest.stats import SLOs, summarize
from loadtest.target import Target
from loadtest.workload import Workload

CONFIRM_ATTEMPTS = 3  # a failed confirmation steps down by one, at most this many times


@dataclass(frozen=True)
class SearchConfig:
    start: int = 1
    limit: int = 1024  # never try more in flight than this
    trial_waves: int = 2
    confirm_waves: int = 4
    trial_duration_s: float = 120.0
    max_trials: int = 30
    poll_interval_s: float = 0.1
    slos: SLOs = SLOs()


@dataclass
class Trial:
    concurrency: int
    phase: str  # search | confirm
    passed: bool
    reasons: list[str]
    summary: dict


@dataclass
class CapacityResult:
    server: str
    url: str
    capacity: int  # largest sustained concurrency found (0: not even one request)
    confirmed: bool
    at_limit: bool  # the search reached `limit` without failing: capacity is a lower bound
    trials: list[Trial] = field(default_factory=list)
    kv_capacity_tokens: float | None = None
    kv_bytes_per_token: float | None = None
    compression_ratio: float | None = None
    tokens_per_request: float | None = None  # mean prompt + completion tokens, server-counted

    @property
    def kv_estimate(self) -> float | None:
        """Sequences the reported KV capacity holds at this workload's length (block rounding aside)."""
        if not self.kv_capacity_tokens or not self.tokens_per_request:
            return None
        return self.kv_capacity_tokens / self.tokens_per_request

    def as_dict(self) -> dict:
        return {
            "server": self.server, "url": self.url, "capacity": self.capacity, "confirmed": self.confirmed,
            "at_limit": self.at_limit, "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_bytes_per_token": self.kv_bytes_per_token, "compression_ratio": self.compression_ratio,
            "tokens_per_request": self.tokens_per_request, "kv_estimate": self.kv_estimate,
            "trials": [{"concurrency": t.concurrency, "phase": t.phase, "passed": t.passed, "reasons": t.reasons,
                        "run_label": t.summary["label"]} for t in self.trials],
        }


def stop_on_preemption(run: RunResult, snapshot: MetricsSnapshot) -> str | None:
    """Criterion 2, checked on every sample so that a failing trial ends at once."""
    before = run.before.preemptions if run.before is not None else None
    if before is not None and snapshot.preemptions is not None and snapshot.preemptions > before:
        return "stopped at the first preemption"
    return None


def judge(summary: dict, concurrency: int, expected: int, slos: SLOs) -> list[str]:
    """Why a trial was not sustained (empty: it was)."""
    server = summary["server_metrics"]
    # A trial stopped at its first preemption says so below, with the count.
    reasons = [summary["aborted"]] if summary["aborted"] and not server["preemptions"] else []
    if summary["failed"]:
        reasons.append(f"{summary['failed']} failed request(s): {summary['failure_reasons']}")
    elif summary["completed"] < expected and not summary["aborted"]:
        reasons.append(f"only {summary['completed']} of {expected} requests completed")
    if server["preemptions"]:
        reasons.append(f"{server['preemptions']:.0f} preemption(s) over the run")
    if server["peak_running"] is None or server["peak_running"] < concurrency:
        reasons.append(f"at most {server['peak_running'] or 0:.0f} of {concurrency} requests running at once")
    percent = f"p{slos.quantile * 100:g}"
    for name, limit in (("ttft", slos.ttft_ms), ("tpot", slos.tpot_ms), ("itl", slos.itl_ms)):
        value = summary["slo_quantile_ms"][name]
        if limit is not None and value is not None and value > limit:
            reasons.append(f"{percent} {name.upper()} {value:.0f} ms > SLO {limit:g} ms")
    return reasons


class CapacitySearch:
    def __init__(self, target: Target, workload: Workload, config: SearchConfig, *, clock0: float,
                 on_run=None, progress: bool = True):
        self.target, self.workload, self.config = target, workload, config
        self._clock0 = clock0
        self._on_run = on_run
        self._progress = progress
        first = target.first_metrics
        self.result = CapacityResult(target.label, target.url, 0, False, False)
        if first is not None:
            self.result.kv_capacity_tokens = first.kv_capacity_tokens
            self.result.kv_bytes_per_token = first.kv_bytes_per_token
            self.result.compression_ratio = first.compression_ratio

    async def run(self) -> CapacityResult:
        first = self.target.first_metrics
        if first is None or first.running is None or first.preemptions is None:
            raise ValueError(f"{self.target.url}: the capacity search needs the server's /metrics with "
                             f"num_requests_running and num_preemptions_total (see --metrics-prefix)")
        low, high = await self._bracket()
        while high is not None and high - low > 1 and self._trials_left():
            middle = (low + high) // 2
            if await self._trial(middle, "search"):
                low = middle
            else:
                high = middle
        self.result.at_limit = high is None
        await self._confirm(low)
        return self.result

    async def _bracket(self) -> tuple[int, int | None]:
        """Double from `start` until a trial fails: (last passed or 0, first failed or None)."""
        low, n = 0, max(1, self.config.start)
        while self._trials_left():
            if not await self._trial(n, "search"):
                return low, n
            low = n
            if n >= self.config.limit:
                break
            n = min(n * 2, self.config.limit)
        return low, None

    async def _confirm(self, found: int) -> None:
        """A steady run at what the search found, one lower after each failure; if none holds, the
        search's figure is reported as not confirmed."""
        self.result.capacity = found
        for n in range(found, max(found - CONFIRM_ATTEMPTS, 0), -1):
            if await self._trial(n, "confirm"):
                self.result.capacity, self.result.confirmed = n, True
                return

    async def _trial(self, n: int, phase: str) -> bool:
        waves = self.config.confirm_waves if phase == "confirm" else self.config.trial_waves
        expected = waves * n
        limits = Limits(max_requests=expected, duration_s=self.config.trial_duration_s, grace_s=0.0)
        run = await run_load(self.target, self.workload, Load(concurrency=n, seed=self.workload.config.seed),
                             limits, clock0=self._clock0, phase=phase, poll_interval_s=self.config.poll_interval_s,
                             stop_when=stop_on_preemption, on_start=self._on_run, progress=self._progress)
        summary = summarize(run, self.config.slos)
        reasons = judge(summary, n, expected, self.config.slos)
        self.result.trials.append(Trial(n, phase, not reasons, reasons, summary))
        if not reasons:
            self._note_request_size(summary)
        return not reasons

    def _note_request_size(self, summary: dict) -> None:
        if summary["completed"]:
            self.result.tokens_per_request = (summary["prompt_tokens"] + summary["completion_tokens"]) / summary["completed"]

    def _trials_left(self) -> bool:
        return len(self.result.trials) < self.config.max_trials
