"""The server's side of a run: /metrics scraped now and then, parsed with prometheus_client.

Gauges (running, waiting, KV usage) are sampled over time; counters (tokens, preemptions) are
compared between a snapshot before and after a run. The most requests that ran at once is read
from the server's own high-water mark (num_requests_running_peak) after the run, when it has one. Names are the server's contract
(`kvsplice:` prefix by default; `--metrics-prefix vllm:` for a vLLM server).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Snapshot field -> metric name after the prefix (sample names, so counters end in _total).
SERIES = {
    "running": "num_requests_running",
    "running_peak": "num_requests_running_peak",
    "waiting": "num_requests_waiting",
    "kv_usage": "kv_cache_usage_perc",
    "kv_bytes_in_use": "kv_cache_bytes_in_use",
    "kv_bytes_per_token": "kv_cache_bytes_per_token",
    "kv_capacity_tokens": "kv_cache_capacity_tokens",
    "compression_ratio": "kv_cache_compression_ratio",
    "prompt_tokens": "prompt_tokens_total",
    "generation_tokens": "generation_tokens_total",
    "preemptions": "num_preemptions_total",
}
SUCCESS = "request_success_total"
CACHE_CONFIG = "cache_config_info"  # labels describe the cache (kv_cache_dtype, ...); value 1
SCRAPE_TIMEOUT_S = 5.0


@dataclass
class MetricsSnapshot:
    """One scrape; a field is None when the server does not export that series."""

    t_s: float  # on the session clock
    running: float | None = None
    running_peak: float | None = None  # most running at once since the server's busy period began
    waiting: float | None = None
    kv_usage: float | None = None
    kv_bytes_in_use: float | None = None
    kv_bytes_per_token: float | None = None
    kv_capacity_tokens: float | None = None
    compression_ratio: float | None = None
    kv_cache_dtype: str | None = None  # from cache_config_info's label (auto, fp8, ...)
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    preemptions: float | None = None
    finished: dict[str, float] = field(default_factory=dict)  # request_success_total by finished_reason

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting


def parse_metrics(text: str, t_s: float, prefix: str = "kvsplice:") -> MetricsSnapshot:
    """Sum each series over its label sets (one model per server; several would be added up)."""
    names = {prefix + metric: attr for attr, metric in SERIES.items()}
    values: dict[str, float] = {}
    finished: dict[str, float] = {}
    kv_cache_dtype = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                attr = names[sample.name]
                values[attr] = values.get(attr, 0.0) + sample.value
            elif sample.name == prefix + SUCCESS:
                reason = sample.labels.get("finished_reason", "")
                finished[reason] = finished.get(reason, 0.0) + sample.value
            elif sample.name == prefix + CACHE_CONFIG:
                kv_cache_dtype = sample.labels.get("kv_cache_dtype", kv_cache_dtype)
    return MetricsSnapshot(t_s, **values, kv_cache_dtype=kv_cache_dtype, finished=finished)


def counter_delta(before: MetricsSnapshot | None, after: MetricsSnapshot | None, attr: str) -> float | None:
    if before is None or after is None:
        return None
    a, b = getattr(before, attr), getattr(after, attr)
    return None if a is None or b is None else b - a


class MetricsSource:
    """Scrapes one server's /metrics."""

    def __init__(self, http: httpx.AsyncClient, url: str, prefix: str, clock0: float):
        self._http = http
        self._url = url + "/metrics"
        self._prefix = prefix
        self._clock0 = clock0

    async def scrape(self) -> MetricsSnapshot:
        """A snapshot, or httpx.HTTPError (including a non-200 status) when it cannot be had."""
        response = await self._http.get(self._url, timeout=SCRAPE_TIMEOUT_S)
        response.raise_for_status()
        return parse_metrics(response.text, time.perf_counter() - self._clock0, self._prefix)

    async def wait_idle(self, timeout_s: float, interval_s: float = 0.05) -> MetricsSnapshot | None:
        """The first snapshot with nothing running or waiting (None if that does not come in time).

        After a run this is also the snapshot whose counters include every finished request: the
        engine refreshes its numbers after delivering a step's outputs, so the last tokens can
        reach us a moment before they are counted.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = await self.scrape()
            if snapshot.idle or time.monotonic() > deadline:
                return snapshot if snapshot.idle else None
            await asyncio.sleep(interval_s)


class MetricsPoller:
    """Samples /metrics every `interval_s` in the background while a run goes on.

    `on_sample` sees each snapshot (the capacity search stops a failing trial from it);
    `on_failure` is told after `max_failures` scrapes in a row failed.
    """

    def __init__(self, source: MetricsSource, interval_s: float, samples: list[MetricsSnapshot],
                 on_sample: Callable[[MetricsSnapshot], None] | None = None,
                 on_failure: Callable[[str], None] | None = None, max_failures: int = 3):
        self.samples = samples  # appended to
        self._source = source
        self._interval_s = interval_s
        self._on_sample = on_sample
        self._on_failure = on_failure
        self._max_failures = max_failures
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        failures = 0
        while True:
            try:
                snapshot = await self._source.scrape()
            except httpx.HTTPError as exc:
                failures += 1
                if failures == self._max_failures and self._on_failure is not None:
                    self._on_failure(f"/metrics failed {failures} times in a row ({type(exc).__name__}: {exc})")
            else:
                failures = 0
                self.samples.append(snapshot)
                if self._on_sample is not None:
                    self._on_sample(snapshot)
            await asyncio.sleep(self._interval_s)
