"""The engine's periodic log line, as vLLM logs it: throughput since the last line, running and
waiting requests, KV cache usage and the prefix cache's hit rate. Silent while the engine idles."""
from __future__ import annotations

import logging
import time

from server.engine.engine_core import EngineStats

log = logging.getLogger("kvsplice.engine")
LOG_INTERVAL_S = 10.0


class StatsLogger:
    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last_time = time.monotonic()
        self._last: EngineStats | None = None

    def maybe_log(self, stats: EngineStats) -> None:
        now = time.monotonic()
        if now - self._last_time < self.interval_s:
            return
        last, elapsed = self._last, now - self._last_time
        self._last, self._last_time = stats, now
        if last is None:
            return
        busy = (stats.prompt_tokens_total, stats.generation_tokens_total) != (
            last.prompt_tokens_total, last.generation_tokens_total) or stats.num_running or stats.num_waiting
        if not busy:
            return
        log.info(line(stats, last, elapsed))


def line(stats: EngineStats, last: EngineStats, elapsed: float) -> str:
    prompt = stats.prompt_tokens_total - last.prompt_tokens_total
    generated = stats.generation_tokens_total - last.generation_tokens_total
    queries = stats.prefix_cache_queries_total - last.prefix_cache_queries_total
    hits = stats.prefix_cache_hits_total - last.prefix_cache_hits_total
    hit_rate = f"{100 * hits / queries:.1f}%" if queries else "-"
    return (f"prompt throughput {prompt / elapsed:.1f} tok/s, generation throughput {generated / elapsed:.1f} "
            f"tok/s, running {stats.num_running}, waiting {stats.num_waiting}, KV cache usage "
            f"{100 * stats.kv_cache_usage:.1f}%, prefix cache hit rate {hit_rate}, preemptions "
            f"{stats.num_preemptions_total - last.num_preemptions_total}")
