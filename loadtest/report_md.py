"""The Markdown report, drawn from results.json (so it can be re-rendered later with `report`)."""
from __future__ import annotations

from loadtest.capacity import __doc__ as CAPACITY_DEFINITION
from loadtest.formatting import count, num, ratio
from loadtest.table import (LATENCY_HEADERS, THROUGHPUT_HEADERS, capacity_line, comparison_headline,
                            latency_row, render_markdown, throughput_row)

DEFINITIONS = """\
- **TTFT**: request sent to first streamed token. **TPOT**: (E2E - TTFT) / (output tokens - 1), per
  request. **ITL**: gap between streamed chunks, per token: a chunk known to hold k tokens (with
  `--token-timing logprobs`) counts k gaps of 1/k. Without logprobs a chunk counts as one token;
  tokens the server sent inside other chunks (its stream skips tokens whose text is still empty)
  are the *unattributed tokens* of the accounting table. **E2E**: request sent to the end of its
  stream. Latencies in ms: mean, median, p90, p99.
- **Throughput**: completed requests and their tokens (the server's `usage` counts) over the run's
  load phase (first request sent to last one ended).
- **Goodput**: completed requests per second whose TTFT, TPOT and E2E are within the SLOs given.
- **Server columns** come from `/metrics`: counters as the change over the run (taken with the server
  idle before and after); peak running as the server's own high-water mark
  (`num_requests_running_peak`, read after the run; the peak of the samples where a server lacks
  it, with a note); other gauges as the peak of the samples taken during the run.
"""


def render_report(doc: dict, plots: list[str]) -> str:
    summaries = [run["summary"] for run in doc["runs"]]
    sections = [_title(doc), _setup(doc)]
    if doc.get("comparison"):
        sections.append(_comparison(doc))
    if doc["capacity"]:
        sections.append(_capacity(doc))
    load_runs = [s for s in summaries if s["phase"] == "run"]
    if load_runs:
        sections.append(_runs("Load runs", load_runs))
    trials = [s for s in summaries if s["phase"] != "run"]
    if trials:
        sections.append(_runs("Capacity trials", trials))
    sections.append(_accounting(summaries))
    sections.append(_failures(summaries))
    if plots:
        sections.append("## Plots\n\n" + "\n\n".join(f"![{p[:-4]}]({p})" for p in plots))
    sections.append("## Definitions\n\n" + DEFINITIONS)
    return "\n\n".join(s for s in sections if s) + "\n"


def _title(doc: dict) -> str:
    lines = [f"# Load test report: {doc['mode']}", "",
             f"- Status: **{doc['status']}**" + (f": {doc['error']}" if doc.get("error") else ""),
             f"- Started {doc['started_at']}, finished {doc.get('finished_at') or '-'}",
             f"- Command: `{doc['command']}`",
             f"- Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs, Python {doc['machine']['python']}"
             + _load(doc['machine'].get('load_average_at_start'))]
    return "\n".join(lines)


def _load(load: list[float] | None) -> str:
    return f", load average at start {load[0]:g} / {load[1]:g} / {load[2]:g} (1 / 5 / 15 min)" if load else ""


def _setup(doc: dict) -> str:
    headers = ["server", "URL", "model", "compression ratio", "KV cache dtype", "KV bytes/token", "KV capacity tokens",
               "max_model_len"]
    rows = [[label, s["url"], f"`{s['model']}`", num(s["compression_ratio"], 2), s.get("kv_cache_dtype") or "-",
             count(s["kv_bytes_per_token"]),
             count(s["kv_capacity_tokens"]), str(s["max_model_len"] or "-")] for label, s in doc["servers"].items()]
    workload = doc["workload"]
    limits = doc["limits"]
    slos = ", ".join(f"{k} {v:g}" for k, v in doc["slos"].items() if v is not None and k != "quantile") or "none"
    return "\n".join([
        "## Setup", "", render_markdown(headers, rows), "",
        f"- Workload: {workload.get('description', '-')}; temperature {workload['temperature']}, "
        f"ignore_eos {workload['ignore_eos']}, token timing by {workload.get('token_timing', 'chunks')}",
        f"- Limits per run: {limits['max_requests']} requests, {limits['duration_s']:g} s "
        f"(+{limits['grace_s']:g} s grace), /metrics every {limits['poll_interval_s']:g} s",
        f"- SLOs (ms): {slos}; quantile for capacity checks p{doc['slos']['quantile'] * 100:g}",
    ])


def _comparison(doc: dict) -> str:
    comparison = doc["comparison"]
    lines = ["## A vs B"]
    headline = comparison_headline(doc)
    if headline:
        c = comparison["capacity"]
        lines += ["", f"**{headline}**", "",
                  render_markdown(["", "A", "B", "B/A"], [
                      ["compression ratio", num(c["compression_ratio_a"], 2), num(c["compression_ratio_b"], 2), "-"],
                      ["KV bytes per token", count(c["bytes_per_token_a"]), count(c["bytes_per_token_b"]),
                       ratio(_div(c["bytes_per_token_b"], c["bytes_per_token_a"]))],
                      ["reported KV capacity (tokens)", count(c["reported_kv_tokens_a"]),
                       count(c["reported_kv_tokens_b"]), ratio(c["reported_ratio"])],
                      ["measured capacity (concurrent requests)", str(c["a"]), str(c["b"]), ratio(c["ratio"])],
                  ])]
    if comparison["points"]:
        headers = ["load", "A req/s", "B req/s", "A out tok/s", "B out tok/s", "B/A tok/s", "A TTFT p90",
                   "B TTFT p90", "A TPOT p50", "B TPOT p50", "A preempt", "B preempt", "A peak waiting",
                   "B peak waiting"]
        rows = []
        for p in comparison["points"]:
            a, b = p["a"], p["b"]
            rows.append([p["label"], num(a["request_throughput"], 2), num(b["request_throughput"], 2),
                         num(a["output_token_throughput"], 1), num(b["output_token_throughput"], 1),
                         ratio(p["ratio"]["output_token_throughput"]), num(a["ttft_p90_ms"]), num(b["ttft_p90_ms"]),
                         num(a["tpot_median_ms"]), num(b["tpot_median_ms"]), count(a["preemptions"]),
                         count(b["preemptions"]), count(a["peak_waiting"]), count(b["peak_waiting"])])
        lines += ["", "Same workload on both (latencies in ms):", "", render_markdown(headers, rows)]
    return "\n".join(lines)


def _capacity(doc: dict) -> str:
    lines = ["## Capacity", ""]
    lines += [f"- {capacity_line(label, c)}" for label, c in doc["capacity"].items()]
    lines += ["", "Search trials (the runs are in *Capacity trials* below):", ""]
    headers = ["server", "concurrency", "phase", "sustained", "why not"]
    rows = [[label, str(t["concurrency"]), t["phase"], "yes" if t["passed"] else "no", "; ".join(t["reasons"]) or "-"]
            for label, c in doc["capacity"].items() for t in c["trials"]]
    definition = "\n".join(line.strip() and "> " + line or ">" for line in CAPACITY_DEFINITION.strip().splitlines())
    lines += [render_markdown(headers, rows), "", "How capacity is defined:", "", definition]
    return "\n".join(lines)


def _runs(title: str, summaries: list[dict]) -> str:
    return "\n".join([
        f"## {title}", "", render_markdown(THROUGHPUT_HEADERS, [throughput_row(s) for s in summaries]), "",
        "Latency (ms):", "", render_markdown(LATENCY_HEADERS, [latency_row(s) for s in summaries]),
    ])


def _accounting(summaries: list[dict]) -> str:
    """The tool's token counts (from usage) against the server's counters over the same run."""
    headers = ["run", "server", "load", "prompt tokens (client)", "prompt tokens (server)",
               "output tokens (client)", "output tokens (server)", "cancelled", "unattributed tokens"]
    rows = [[str(s["run_id"]), s["server"], s["label"], str(s["prompt_tokens"]),
             count(s["server_metrics"]["prompt_tokens"]), str(s["completion_tokens"]),
             count(s["server_metrics"]["generation_tokens"]), str(s["cancelled"]), str(s["unattributed_tokens"])]
            for s in summaries]
    note = ("Client counts are the `usage` of completed requests; server counts are the change of "
            "`prompt_tokens_total` / `generation_tokens_total` over the run. They differ only when requests "
            "were cancelled or failed mid-way (a capacity trial stopped early, a time limit, a failing server).")
    return "\n".join(["## Token accounting", "", note, "", render_markdown(headers, rows)])


def _failures(summaries: list[dict]) -> str:
    rows = [[str(s["run_id"]), s["server"], s["label"], kind, str(n)]
            for s in summaries for kind, n in s["failure_reasons"].items()]
    notes = [f"- run {s['run_id']} ({s['server']} {s['label']}): {note}" for s in summaries for note in s["notes"]]
    aborted = [f"- run {s['run_id']} ({s['server']} {s['label']}) ended early: {s['aborted']}"
               for s in summaries if s["aborted"] and s["phase"] == "run"]
    if not rows and not notes and not aborted:
        return "## Failures\n\nNone: no request failed and no run ended early."
    parts = ["## Failures"]
    if rows:
        parts += ["", render_markdown(["run", "server", "load", "reason", "requests"], rows)]
    if aborted or notes:
        parts += [""] + aborted + notes
    return "\n".join(parts)


def _div(b, a):
    return b / a if a and b is not None else None
