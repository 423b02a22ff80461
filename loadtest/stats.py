"""From a run's raw requests and samples to its summary: throughput, latency percentiles, goodput,
and what the server itself counted over the run.

Latencies are per request (TTFT, TPOT, E2E) or per token (ITL) and are reported in milliseconds.
Throughput is over the run's load phase: first request sent to last request ended.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from loadtest.runner import RunResult
from loadtest.server_metrics import counter_delta

STATS = ("mean", "median", "p90", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class SLOs:
    """Targets in milliseconds (None: not checked). A request is *good* (goodput) when its TTFT, TPOT
    and E2E are within theirs; a capacity trial needs the run's `quantile` of TTFT and ITL within theirs."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None
    quantile: float = 0.9

    def as_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "itl_ms": self.itl_ms, "e2e_ms": self.e2e_ms,
                "quantile": self.quantile}


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def describe(values_s: list[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 in milliseconds (None when there are no values)."""
    if not values_s:
        return dict.fromkeys(STATS)
    ms = [v * 1000.0 for v in values_s]
    return {"mean": sum(ms) / len(ms), "median": quantile(ms, 0.5), "p90": quantile(ms, 0.9),
            "p99": quantile(ms, 0.99)}


def summarize(run: RunResult, slos: SLOs) -> dict:
    done = [r for r in run.requests if r.ok]
    failed = [r for r in run.requests if r.failed]
    duration = run.duration_s
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    completion_tokens = sum(r.completion_tokens or 0 for r in done)
    good = [r for r in done if _is_good(r, slos)]
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    return {
        "server": run.server, "label": run.label, "mode": run.mode,
        "value": run.value if math.isfinite(run.value) else None, "phase": run.phase,
        "duration_s": duration, "stop_reason": run.stop_reason, "aborted": run.aborted,
        "requests_sent": len(run.requests), "completed": len(done), "failed": len(failed),
        "cancelled": sum(1 for r in run.requests if r.error_kind == "cancelled"),
        "failure_reasons": dict(Counter(r.error_kind for r in failed)),
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "request_throughput": per_s(len(done)), "output_token_throughput": per_s(completion_tokens),
        "total_token_throughput": per_s(prompt_tokens + completion_tokens),
        "goodput": per_s(len(good)) if _has_request_slos(slos) else None,
        "good_fraction": len(good) / len(done) if done and _has_request_slos(slos) else None,
        "peak_in_flight": run.peak_in_flight,
        "unattributed_tokens": sum(r.unattributed_tokens for r in done),
        "ttft_ms": describe([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": describe([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": describe([gap for r in done for gap in r.itl_s]),
        "e2e_ms": describe([r.e2e_s for r in done if r.e2e_s is not None]),
        "slo_quantile_ms": _slo_quantiles(run, slos.quantile),
        "server_metrics": _server_side(run),
        "notes": [*run.notes, *_peak_running_notes(run)],
    }


def _has_request_slos(slos: SLOs) -> bool:
    return any(v is not None for v in (slos.ttft_ms, slos.tpot_ms, slos.e2e_ms))


def _is_good(r, slos: SLOs) -> bool:
    checks = ((r.ttft_s, slos.ttft_ms), (r.tpot_s, slos.tpot_ms), (r.e2e_s, slos.e2e_ms))
    return all(limit is None or (value is not None and value * 1000.0 <= limit) for value, limit in checks)


def _slo_quantiles(run: RunResult, q: float) -> dict[str, float | None]:
    """The quantile the capacity criterion checks (TTFT, TPOT, ITL), in ms."""
    done = [r for r in run.requests if r.ok]
    series = {"ttft": [r.ttft_s for r in done if r.ttft_s is not None],
              "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
              "itl": [gap for r in done for gap in r.itl_s]}
    return {name: quantile(values, q) * 1000.0 if values else None for name, values in series.items()}


def _server_side(run: RunResult) -> dict:
    """What /metrics said: counter deltas over the run, the server's peak of running requests (or
    the samples' where it has none), other gauges' peaks from the samples, cache facts."""
    samples = run.samples
    info = run.before or run.after or (samples[0] if samples else None)

    def peak(attr: str) -> float | None:
        values = [getattr(s, attr) for s in samples if getattr(s, attr) is not None]
        return max(values) if values else None

    kv = [s.kv_usage for s in samples if s.kv_usage is not None]
    return {
        "samples": len(samples),
        "preemptions": counter_delta(run.before, run.after, "preemptions") if run.after
        else _sampled_delta(run, "preemptions"),
        "prompt_tokens": counter_delta(run.before, run.after, "prompt_tokens"),
        "generation_tokens": counter_delta(run.before, run.after, "generation_tokens"),
        "peak_running": peak_running(run), "peak_waiting": peak("waiting"),
        "peak_kv_usage": max(kv) if kv else None, "mean_kv_usage": sum(kv) / len(kv) if kv else None,
        "kv_bytes_per_token": info.kv_bytes_per_token if info else None,
        "kv_capacity_tokens": info.kv_capacity_tokens if info else None,
        "compression_ratio": info.compression_ratio if info else None,
    }


def peak_running(run: RunResult) -> float | None:
    """The most requests the server ran at once during the run.

    The server's own high-water mark, read after the run. The runner starts a run only on an idle
    server, so the busy period that mark covers began with one of this run's requests (the last
    such period, if the server went idle in between): it can understate the run's peak, never
    overstate it. Where the server has no such series, the highest sample of num_requests_running,
    which misses a peak shorter than the sampling interval.
    """
    after = run.after
    if after is None or after.running_peak is None:
        values = [s.running for s in run.samples if s.running is not None]
        return max(values) if values else None
    if counter_delta(run.before, after, "prompt_tokens") == 0:
        return 0.0  # none of this run's requests reached the engine: the mark is from an earlier run
    return after.running_peak


def _peak_running_notes(run: RunResult) -> list[str]:
    if not run.samples or (run.after is not None and run.after.running_peak is not None):
        return []
    why = "the server exports no num_requests_running_peak" if run.after is not None else \
        "no /metrics snapshot after the run"
    return [f"{why}: peak_running is the highest of {len(run.samples)} samples of num_requests_running, "
            "which can miss a peak shorter than the sampling interval"]


def _sampled_delta(run: RunResult, attr: str) -> float | None:
    """A counter's rise from the first snapshot we have to the last sample (a run cut short has no `after`)."""
    first = run.before or (run.samples[0] if run.samples else None)
    return counter_delta(first, run.samples[-1], attr) if run.samples else None
