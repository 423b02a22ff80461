"""The summary table: the same rows on the terminal and in the Markdown report."""
from __future__ import annotations

from loadtest.formatting import count, num, percent, ratio

THROUGHPUT_HEADERS = ["run", "server", "load", "phase", "completed", "failed", "req/s", "output tok/s",
                      "total tok/s", "goodput req/s", "peak in flight", "preemptions", "peak waiting",
                      "peak KV"]
LATENCY_HEADERS = ["run", "server", "load", "TTFT mean", "TTFT median", "TTFT p90", "TTFT p99", "TPOT mean",
                   "TPOT median", "TPOT p90", "TPOT p99", "ITL median", "ITL p90", "ITL p99", "E2E median",
                   "E2E p90", "E2E p99"]
TERMINAL_HEADERS = ["run", "server", "load", "phase", "done", "fail", "req/s", "out tok/s", "TTFT p50 ms",
                    "TTFT p90 ms", "TPOT p50 ms", "ITL p90 ms", "E2E p50 ms", "peak", "preempt", "waiting", "KV max"]


def throughput_row(s: dict) -> list[str]:
    server = s["server_metrics"]
    return [str(s["run_id"]), s["server"], s["label"], s["phase"], str(s["completed"]), str(s["failed"]),
            num(s["request_throughput"], 2), num(s["output_token_throughput"], 1),
            num(s["total_token_throughput"], 1), num(s["goodput"], 2), str(s["peak_in_flight"]),
            count(server["preemptions"]), count(server["peak_waiting"]), percent(server["peak_kv_usage"])]


def latency_row(s: dict) -> list[str]:
    cells = [str(s["run_id"]), s["server"], s["label"]]
    cells += [num(s["ttft_ms"][k]) for k in ("mean", "median", "p90", "p99")]
    cells += [num(s["tpot_ms"][k]) for k in ("mean", "median", "p90", "p99")]
    cells += [num(s["itl_ms"][k]) for k in ("median", "p90", "p99")]
    cells += [num(s["e2e_ms"][k]) for k in ("median", "p90", "p99")]
    return cells


def terminal_row(s: dict) -> list[str]:
    server = s["server_metrics"]
    return [str(s["run_id"]), s["server"], s["label"], s["phase"], str(s["completed"]), str(s["failed"]),
            num(s["request_throughput"], 2), num(s["output_token_throughput"], 1), num(s["ttft_ms"]["median"]),
            num(s["ttft_ms"]["p90"]), num(s["tpot_ms"]["median"]), num(s["itl_ms"]["p90"]),
            num(s["e2e_ms"]["median"]), str(s["peak_in_flight"]), count(server["preemptions"]),
            count(server["peak_waiting"]), percent(server["peak_kv_usage"])]


def render_text(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def render_markdown(headers: list[str], rows: list[list[str]]) -> str:
    """Numeric columns right-aligned, text columns left-aligned."""
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _is_number(cell: str) -> bool:
    return cell == "-" or cell.rstrip("%x").replace(".", "", 1).lstrip("-").isdigit()


def terminal_summary(doc: dict) -> str:
    """What is printed at the end: the runs, then capacities and the comparison's headline."""
    summaries = [run["summary"] for run in doc["runs"]]
    parts = [render_text(TERMINAL_HEADERS, [terminal_row(s) for s in summaries])]
    parts += [capacity_line(label, c) for label, c in doc["capacity"].items()]
    headline = comparison_headline(doc)
    if headline:
        parts.append(headline)
    return "\n".join(parts)


def capacity_line(label: str, c: dict) -> str:
    bound = " (search limit reached: a lower bound)" if c["at_limit"] else ""
    confirmed = "confirmed" if c["confirmed"] else "NOT confirmed by the steady run"
    estimate = f"; KV estimate {num(c['kv_estimate'])} sequences" if c.get("kv_estimate") else ""
    return (f"capacity {label}: {c['capacity']} concurrent requests, {confirmed}{bound} "
            f"(KV capacity {count(c['kv_capacity_tokens'])} tokens{estimate})")


def comparison_headline(doc: dict) -> str | None:
    comparison = (doc.get("comparison") or {}).get("capacity")
    if not comparison:
        return None
    return (f"capacity B/A: {ratio(comparison['ratio'])} measured ({comparison['b']} vs {comparison['a']}); "
            f"reported KV capacity ratio {ratio(comparison['reported_ratio'])}; "
            f"measured/reported {num(comparison['measured_over_reported'], 3)}")
