"""Prometheus metrics (`kvsplice:` prefix, label `model_name` on every series).

The names are a contract: the Grafana dashboard, the autoscaler and the load tester read them.
Gauges and the engine's own counters are read from `engine.stats()` at scrape time, so they are
exact at every scrape without a polling task. Per-request histograms are observed by the API as
outputs arrive. Each app gets its own CollectorRegistry so several apps can live in one process.

With `vllm_names` (the default) every series is also exposed under vLLM's `vllm:` prefix, plus the
older names vLLM's example Grafana dashboard still queries (`gpu_cache_usage_perc`, and zeros for
`cpu_cache_usage_perc` and `num_requests_swapped`: this engine never swaps to the CPU), so
dashboards and alerts written for vLLM work unchanged.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from server.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)
request_log = logging.getLogger("kvsplice.requests")

MODEL_LABEL = "model_name"
PREFIX, VLLM_PREFIX = "kvsplice:", "vllm:"
FINISHED_REASONS = ("stop", "length", "abort", "error")  # every one exported from the start, at 0

# (metric name, help, EngineStats attribute)
ENGINE_GAUGES = [
    ("kvsplice:num_requests_running", "Requests in the running batch", "num_running"),
    ("kvsplice:num_requests_running_peak",
     "Most requests running at once in one engine step (after admission) since the current busy period "
     "began; a busy period begins when a request arrives at an engine with none running or waiting, and "
     "the value is kept after the engine goes idle", "num_running_peak"),
    ("kvsplice:num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
    ("kvsplice:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)", "kv_cache_usage"),
    ("kvsplice:kv_cache_bytes_per_token", "KV cache bytes per token, all layers", "kv_bytes_per_token"),
    ("kvsplice:kv_cache_capacity_tokens", "Tokens the KV cache can hold", "kv_capacity_tokens"),
    ("kvsplice:kv_cache_bytes_in_use", "KV cache bytes held by live sequences", "kv_bytes_in_use"),
    ("kvsplice:kv_cache_compression_ratio", "Fraction of the MLA latent stored (1.0 = plain MLA)", "compression_ratio"),
]
CACHE_CONFIG_LABELS = ("kv_cache_dtype", "compression_ratio", "block_size", "num_blocks_total", "kv_bytes_per_token")
# vLLM's label names for two of them, so its queries on cache_config_info match as well.
VLLM_CACHE_CONFIG_LABELS = {"cache_dtype": "kv_cache_dtype", "num_gpu_blocks": "num_blocks_total"}
ENGINE_COUNTERS = [
    ("kvsplice:prompt_tokens_total", "Prompt tokens processed", "prompt_tokens_total"),
    ("kvsplice:generation_tokens_total", "Tokens generated", "generation_tokens_total"),
    ("kvsplice:num_preemptions_total", "Sequences preempted for lack of KV blocks", "num_preemptions_total"),
    ("kvsplice:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries_total"),
    ("kvsplice:prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not computed again)",
     "prefix_cache_hits_total"),
]

_LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0]
_ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.5, 5.0]
_REQUEST_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
_TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class EngineStatsCollector(Collector):
    """Turns one `engine.stats()` snapshot into the gauge and counter families at each scrape."""

    def __init__(self, engine, model_name: str):
        self._engine = engine
        self._model_name = model_name

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect(), i.e. the engine, at registration.
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._engine.stats()
        except Exception:  # a dead engine must not break the scrape; /health reports it
            logger.warning("engine.stats() failed; engine series left out of this scrape", exc_info=True)
            return []
        return self._families(stats)

    def _families(self, stats) -> list[Metric]:
        families: list[Metric] = []
        for kind, table in ((GaugeMetricFamily, ENGINE_GAUGES), (CounterMetricFamily, ENGINE_COUNTERS)):
            for name, doc, attr in table:
                family = kind(name, doc, labels=[MODEL_LABEL])
                if stats is not None:
                    family.add_metric([self._model_name], float(getattr(stats, attr)))
                families.append(family)
        families.append(self._cache_config(stats))
        families.append(self._iteration_tokens(stats))
        return families

    def _iteration_tokens(self, stats) -> Metric:
        family = HistogramMetricFamily("kvsplice:iteration_tokens_total", "Tokens scheduled per engine step",
                                       labels=[MODEL_LABEL])
        if stats is not None:
            it = stats.iteration_tokens
            family.add_metric([self._model_name], it.cumulative(), it.total_tokens)
        return family

    def _cache_config(self, stats) -> Metric:
        # vLLM's cache_config_info idea: the cache's configuration as labels of a constant 1.
        family = GaugeMetricFamily(
            "kvsplice:cache_config_info", "KV cache configuration (labels; value 1)",
            labels=[MODEL_LABEL, *CACHE_CONFIG_LABELS, *VLLM_CACHE_CONFIG_LABELS])
        if stats is not None:
            attrs = [*CACHE_CONFIG_LABELS, *VLLM_CACHE_CONFIG_LABELS.values()]
            family.add_metric([self._model_name, *(str(getattr(stats, a)) for a in attrs)], 1.0)
        return family


class ServerMetrics:
    """The app's registry: engine snapshot series plus per-request latency and size histograms."""

    def __init__(self, engine, model_name: str, log_requests: bool = True, vllm_names: bool = True):
        self.model_name = model_name
        self.log_requests = log_requests  # one info line per finished request
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine, model_name))
        self.vllm_view: CollectorRegistry | None = None
        if vllm_names:
            self.vllm_view = CollectorRegistry()
            self.vllm_view.register(VllmNames(self.registry))

        def histogram(name: str, doc: str, buckets: list[float]):
            return Histogram(name, doc, [MODEL_LABEL], buckets=buckets, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "kvsplice:time_to_first_token_seconds", "Arrival to first generated token", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "kvsplice:inter_token_latency_seconds", "Gap between successive token deliveries", _ITL_BUCKETS)
        self.time_per_output_token = histogram(  # vLLM's older name for the same observations
            "kvsplice:time_per_output_token_seconds", "Gap between successive token deliveries", _ITL_BUCKETS)
        self.request_time_per_output_token = histogram(
            "kvsplice:request_time_per_output_token_seconds", "Decode time / (generated tokens - 1), per request",
            _ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "kvsplice:e2e_request_latency_seconds", "Arrival to finish", _REQUEST_BUCKETS)
        self.request_queue_time = histogram(
            "kvsplice:request_queue_time_seconds", "Arrival to first scheduled", _REQUEST_BUCKETS)
        self.request_prefill_time = histogram(
            "kvsplice:request_prefill_time_seconds", "First scheduled to first token", _REQUEST_BUCKETS)
        self.request_decode_time = histogram(
            "kvsplice:request_decode_time_seconds", "First token to finish", _REQUEST_BUCKETS)
        self.request_inference_time = histogram(
            "kvsplice:request_inference_time_seconds", "First scheduled to finish", _REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram(
            "kvsplice:request_prompt_tokens", "Prompt length of finished requests", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "kvsplice:request_generation_tokens", "Generated length of finished requests", _TOKEN_BUCKETS)
        self.request_max_num_generation_tokens = histogram(  # one sequence per request here: the same values
            "kvsplice:request_max_num_generation_tokens", "Longest generated sequence of finished requests",
            _TOKEN_BUCKETS)
        self._request_success = Counter(
            "kvsplice:request_success_total", "Finished requests by finish reason",
            [MODEL_LABEL, "finished_reason"], registry=self.registry)
        for reason in FINISHED_REASONS:  # a rate() over a reason that has not happened yet is 0, not absent
            self._request_success.labels(model_name, reason)

    def count_finished(self, reason: str) -> None:
        self._request_success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        text = generate_latest(self.registry)
        return text if self.vllm_view is None else text + generate_latest(self.vllm_view)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Times one request from the outputs it delivers; the engine's own clock marks win where present."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self._submitted = time.time()
        self._last_delivery: float | None = None
        self._finished = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.time()
        count = len(out.delta_token_ids)
        if count:
            self._on_tokens(out, now, count)
        if out.finished and not self._finished:
            self._finished = True
            self._on_finished(out, now)

    def on_closed(self) -> None:
        """The consumer stopped before the last output (client gone, server draining): an abort."""
        if not self._finished:
            self._finished = True
            self._metrics.count_finished("abort")

    def _on_tokens(self, out: RequestOutput, now: float, count: int) -> None:
        m = self._metrics
        if self._last_delivery is None:
            times = out.times
            first = times.first_token if times and times.first_token else now
            m.time_to_first_token.observe(max(0.0, first - self._arrival(out)))
        else:
            # Several tokens in one delivery (a slow consumer): spread the gap so the histogram
            # stays per token rather than per delivery.
            gap = (now - self._last_delivery) / count
            for _ in range(count):
                m.inter_token_latency.observe(gap)
                m.time_per_output_token.observe(gap)
        self._last_delivery = now

    def _on_finished(self, out: RequestOutput, now: float) -> None:
        m = self._metrics
        times = out.times
        arrival = self._arrival(out)
        m.count_finished(out.finish_reason or "stop")
        m.e2e_request_latency.observe(max(0.0, ((times.finished if times and times.finished else now) - arrival)))
        if times and times.first_scheduled:
            m.request_queue_time.observe(max(0.0, times.first_scheduled - arrival))
        self._phases(out, now)
        m.request_prompt_tokens.observe(len(out.prompt_token_ids))
        m.request_generation_tokens.observe(len(out.token_ids))
        m.request_max_num_generation_tokens.observe(len(out.token_ids))
        if m.log_requests:
            first = times.first_token if times and times.first_token else None
            request_log.info("request %s finished (%s): %d prompt + %d generated tokens, TTFT %s, e2e %.3f s, "
                             "%d preemptions", out.request_id, out.finish_reason or "stop", len(out.prompt_token_ids),
                             len(out.token_ids), "-" if first is None else f"{first - arrival:.3f} s",
                             max(0.0, now - arrival), out.num_preemptions)

    def _phases(self, out: RequestOutput, now: float) -> None:
        """Prefill (scheduled -> first token), decode (first token -> finish) and their sum."""
        m, times = self._metrics, out.times
        if not times or not times.first_scheduled:
            return
        finished = times.finished or now
        m.request_inference_time.observe(max(0.0, finished - times.first_scheduled))
        if times.first_token:
            decode = max(0.0, finished - times.first_token)
            m.request_prefill_time.observe(max(0.0, times.first_token - times.first_scheduled))
            m.request_decode_time.observe(decode)
            if len(out.token_ids) > 1:
                m.request_time_per_output_token.observe(decode / (len(out.token_ids) - 1))

    def _arrival(self, out: RequestOutput) -> float:
        return out.times.arrival if out.times and out.times.arrival else self._submitted


class VllmNames(Collector):
    """Every series of `source` again under vLLM's prefix, plus the names only vLLM's dashboards use."""

    ALIASES = {"kv_cache_usage_perc": "gpu_cache_usage_perc"}  # ours -> vLLM's older name, same value
    ZEROS = {"cpu_cache_usage_perc": "KV cache usage on the CPU (this engine has no CPU swap space)",
             "num_requests_swapped": "Requests swapped to the CPU (this engine recomputes instead)"}

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []  # collect() only at scrape time: it asks the engine

    def collect(self) -> Iterable[Metric]:
        models: set[str] = set()
        for family in self._source.collect():
            if not family.name.startswith(PREFIX):
                continue
            base = family.name[len(PREFIX):]
            yield _renamed(family, VLLM_PREFIX + base)
            if base in self.ALIASES:
                yield _renamed(family, VLLM_PREFIX + self.ALIASES[base])
            models |= {s.labels[MODEL_LABEL] for s in family.samples if MODEL_LABEL in s.labels}
        for name, doc in self.ZEROS.items():
            family = GaugeMetricFamily(VLLM_PREFIX + name, doc, labels=[MODEL_LABEL])
            for model in sorted(models):
                family.add_metric([model], 0.0)
            yield family


def _renamed(family: Metric, name: str) -> Metric:
    """A copy of `family` called `name`, its samples' names changed with it (suffixes kept)."""
    copy = Metric(name, family.documentation, family.type, family.unit)
    copy.samples = [Sample(name + s.name[len(family.name):], s.labels, s.value, s.timestamp, s.exemplar)
                    for s in family.samples]
    return copy
