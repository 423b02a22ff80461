"""A vs B: the same workload against two servers (e.g. compression ratio 1.0 and 0.5), side by side.

Ratios are B over A, so with A = plain MLA and B = KVSplice 0.5 a capacity ratio of 1.8 means B
sustains 1.8x the concurrency. The measured capacity ratio is set against the ratio of the KV
capacities the servers report (kvsplice:kv_cache_capacity_tokens): if the cache is what limits
concurrency, the two agree up to block rounding.
"""
from __future__ import annotations

# Per load point: what is set side by side (summary path -> name).
POINT_FIELDS = {
    ("request_throughput",): "request_throughput",
    ("output_token_throughput",): "output_token_throughput",
    ("ttft_ms", "p90"): "ttft_p90_ms",
    ("tpot_ms", "median"): "tpot_median_ms",
    ("e2e_ms", "median"): "e2e_median_ms",
    ("completed",): "completed",
    ("failed",): "failed",
    ("server_metrics", "preemptions"): "preemptions",
    ("server_metrics", "peak_waiting"): "peak_waiting",
    ("server_metrics", "peak_kv_usage"): "peak_kv_usage",
}


def compare(capacity: dict[str, dict], summaries: list[dict]) -> dict:
    """The comparison block of the results: capacities and their ratio, then each load point."""
    result: dict = {"capacity": _capacity(capacity.get("A"), capacity.get("B")), "points": []}
    runs = [s for s in summaries if s["phase"] == "run"]
    for a in (s for s in runs if s["server"] == "A"):
        b = next((s for s in runs if s["server"] == "B" and s["label"] == a["label"]), None)
        if b is not None:
            result["points"].append(_point(a, b))
    return result


def _capacity(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b:
        return None
    measured = _ratio(b["capacity"], a["capacity"])
    reported = _ratio(b.get("kv_capacity_tokens"), a.get("kv_capacity_tokens"))
    return {
        "a": a["capacity"], "b": b["capacity"], "ratio": measured,
        "a_confirmed": a["confirmed"], "b_confirmed": b["confirmed"],
        "a_at_limit": a["at_limit"], "b_at_limit": b["at_limit"],
        "reported_kv_tokens_a": a.get("kv_capacity_tokens"), "reported_kv_tokens_b": b.get("kv_capacity_tokens"),
        "reported_ratio": reported,
        "measured_over_reported": _ratio(measured, reported),
        "bytes_per_token_a": a.get("kv_bytes_per_token"), "bytes_per_token_b": b.get("kv_bytes_per_token"),
        "compression_ratio_a": a.get("compression_ratio"), "compression_ratio_b": b.get("compression_ratio"),
    }


def _point(a: dict, b: dict) -> dict:
    point = {"label": a["label"], "mode": a["mode"], "value": a["value"], "a": {}, "b": {}, "ratio": {}}
    for path, name in POINT_FIELDS.items():
        point["a"][name], point["b"][name] = _get(a, path), _get(b, path)
        point["ratio"][name] = _ratio(point["b"][name], point["a"][name])
    return point


def _get(summary: dict, path: tuple[str, ...]):
    value = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _ratio(b, a) -> float | None:
    return b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None
