"""PNG plots drawn from results.json: throughput and latency against the load, KV usage over time,
the capacity search, and A vs B. Small figures at a modest dpi: a report stays well under 1 MB."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window, works without a display
import matplotlib.pyplot as plt  # noqa: E402

DPI = 90
COLORS = {"A": "tab:blue", "B": "tab:orange", "server": "tab:blue"}


def write_plots(doc: dict, out_dir: Path) -> list[str]:
    """Every plot the results support; returns the file names written."""
    out_dir = Path(out_dir)
    written = []
    for name, draw in (("throughput.png", _throughput), ("latency.png", _latency), ("kv_usage.png", _kv_usage),
                       ("capacity_search.png", _capacity_search), ("compare.png", _compare)):
        figure = draw(doc)
        if figure is not None:
            figure.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
            plt.close(figure)
            written.append(name)
    return written


def _load_runs(doc: dict) -> dict[str, list[dict]]:
    """Summaries of the load runs (not capacity trials) with a finite x value, by server, sorted by x."""
    by_server: dict[str, list[dict]] = {}
    for run in doc["runs"]:
        s = run["summary"]
        if s["phase"] == "run" and s["value"] is not None and s["completed"]:
            by_server.setdefault(s["server"], []).append(s)
    return {k: sorted(v, key=lambda s: s["value"]) for k, v in by_server.items()}


def _x_label(runs: dict[str, list[dict]]) -> str:
    modes = {s["mode"] for group in runs.values() for s in group}
    return "concurrency (requests in flight)" if modes == {"concurrency"} else "request rate (req/s)"


def _x_axis(axis, runs: dict[str, list[dict]]) -> None:
    """Label the x axis; a wide sweep (1, 4, 16, 64) on a log scale with the tried values as ticks."""
    values = sorted({s["value"] for group in runs.values() for s in group})
    axis.set_xlabel(_x_label(runs))
    if values and values[0] > 0 and values[-1] / values[0] >= 8:
        axis.set_xscale("log", base=2)
    axis.set_xticks(values, [f"{v:g}" for v in values])
    axis.minorticks_off()


def _server_name(doc: dict, label: str) -> str:
    server = doc["servers"].get(label) or {}
    ratio, kv_dtype = server.get("compression_ratio"), server.get("kv_cache_dtype")
    if ratio is None:
        return label
    return f"{label} (ratio {ratio:g}" + (f", {kv_dtype})" if kv_dtype not in (None, "auto") else ")")


def _throughput(doc: dict):
    runs = _load_runs(doc)
    if not runs:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, group in runs.items():
        x = [s["value"] for s in group]
        style = dict(marker="o", color=COLORS.get(label), label=_server_name(doc, label))
        axes[0].plot(x, [s["request_throughput"] for s in group], **style)
        axes[1].plot(x, [s["output_token_throughput"] for s in group], **style)
    for axis, title in zip(axes, ("requests / s", "output tokens / s")):
        axis.set_title(title)
        _x_axis(axis, runs)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Throughput")
    return figure


def _latency(doc: dict):
    runs = _load_runs(doc)
    if not runs:
        return None
    figure, axes = plt.subplots(2, 2, figsize=(9, 6))
    for axis, (key, title) in zip(axes.flat, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                                              ("e2e_ms", "E2E latency"))):
        for label, group in runs.items():
            x = [s["value"] for s in group]
            color = COLORS.get(label)
            axis.plot(x, [s[key]["median"] for s in group], marker="o", color=color,
                      label=f"{_server_name(doc, label)} median")
            axis.plot(x, [s[key]["p90"] for s in group], marker="^", linestyle="--", color=color,
                      label=f"{_server_name(doc, label)} p90")
        axis.set_title(f"{title} (ms)")
        _x_axis(axis, runs)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def _kv_usage(doc: dict):
    """KV usage and running / waiting requests over the session, one panel per server."""
    servers = [label for label in doc["servers"] if any(
        run["samples"]["t_s"] and run["summary"]["server"] == label for run in doc["runs"])]
    if not servers:
        return None
    figure, axes = plt.subplots(len(servers), 1, figsize=(9, 2.8 * len(servers)), squeeze=False)
    for axis, label in zip(axes[:, 0], servers):
        runs = [run for run in doc["runs"] if run["summary"]["server"] == label and run["samples"]["t_s"]]
        t, kv, running, waiting = _series(runs)
        axis.plot(t, kv, color="tab:green", label="KV usage %")
        axis.set_ylim(0, 105)
        axis.set_ylabel("KV usage %")
        counts = axis.twinx()
        counts.plot(t, running, color="tab:blue", lw=0.8, label="running")
        counts.plot(t, waiting, color="tab:red", lw=0.8, label="waiting")
        counts.set_ylabel("requests")
        counts.set_ylim(bottom=0)
        for run in runs:  # shade each run: grey for load runs, green / red for passed / failed trials
            axis.axvspan(run["samples"]["t_s"][0], run["samples"]["t_s"][-1], alpha=0.08,
                         color=_run_color(doc, run["summary"]))
        axis.set_title(f"{_server_name(doc, label)}: KV cache usage, running and waiting requests")
        axis.set_xlabel("time since the tool started (s)")
        lines = axis.get_lines() + counts.get_lines()
        axis.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def _series(runs: list[dict]) -> tuple[list[float], ...]:
    """Time, KV %, running, waiting; a NaN between runs so that idle gaps are not drawn as lines."""
    t, kv, running, waiting = [], [], [], []
    for run in runs:
        samples = run["samples"]
        t += samples["t_s"]
        kv += [100 * (v or 0) for v in samples["kv_usage"]]
        running += [v or 0 for v in samples["running"]]
        waiting += [v or 0 for v in samples["waiting"]]
        for series in (t, kv, running, waiting):
            series.append(math.nan)
    return t, kv, running, waiting


def _run_color(doc: dict, summary: dict) -> str:
    if summary["phase"] == "run":
        return "grey"
    trials = (doc["capacity"].get(summary["server"]) or {}).get("trials", [])
    passed = next((t["passed"] for t in trials if t["run_label"] == summary["label"] and t["phase"] == summary["phase"]),
                  None)
    return "green" if passed else "red"


def _capacity_search(doc: dict):
    if not doc["capacity"]:
        return None
    results = list(doc["capacity"].items())
    figure, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), squeeze=False, sharey=True)
    for axis, (label, result) in zip(axes[0], results):
        trials = result["trials"]
        x = list(range(1, len(trials) + 1))
        axis.plot(x, [t["concurrency"] for t in trials], color="grey", alpha=0.4)
        for xi, trial in zip(x, trials):
            axis.scatter(xi, trial["concurrency"], color="green" if trial["passed"] else "red",
                         marker="s" if trial["phase"] == "confirm" else "o", zorder=3)
        axis.axhline(result["capacity"], color=COLORS.get(label), linestyle=":", label=f"capacity {result['capacity']}")
        axis.set_title(f"{_server_name(doc, label)}", fontsize=10)
        axis.set_xlabel("trial (o search, s confirm)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("concurrency (green sustained, red not)")
    figure.suptitle("Capacity search")
    figure.tight_layout()
    return figure


def _compare(doc: dict):
    comparison = doc.get("comparison")
    if not comparison:
        return None
    capacity, points = comparison.get("capacity"), comparison.get("points", [])
    panels = [p for p in (capacity, points) if p]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    axes = list(axes[0])
    if capacity:
        _capacity_bars(doc, axes.pop(0), capacity)
    if points:
        _throughput_bars(doc, axes.pop(0), points)
    figure.tight_layout()
    return figure


def _capacity_bars(doc: dict, axis, capacity: dict) -> None:
    names = [_server_name(doc, "A"), _server_name(doc, "B")]
    bars = axis.bar(names, [capacity["a"], capacity["b"]], color=[COLORS["A"], COLORS["B"]])
    axis.bar_label(bars, label_type="center", color="white", fontsize=12)
    estimates = [_estimate(doc, "A"), _estimate(doc, "B")]
    if all(e is not None for e in estimates):
        axis.scatter(names, estimates, marker="_", s=900, color="black", zorder=3,
                     label="reported KV capacity / tokens per request")
        axis.legend(fontsize=7, loc="upper left")
    reported = capacity["reported_ratio"]
    axis.set_title(f"Sustained concurrency: B/A = {capacity['ratio'] or 0:.2f}x"
                   + (f"\n(reported KV capacity ratio {reported:.2f}x)" if reported else ""), fontsize=10)
    axis.set_ylabel("requests in flight")
    axis.set_ylim(0, 1.3 * max(capacity["a"], capacity["b"], *(e or 0 for e in estimates), 1))


def _estimate(doc: dict, label: str) -> float | None:
    return (doc["capacity"].get(label) or {}).get("kv_estimate")


def _throughput_bars(doc: dict, axis, points: list[dict]) -> None:
    width = 0.38
    x = list(range(len(points)))
    a = [p["a"]["output_token_throughput"] or 0 for p in points]
    b = [p["b"]["output_token_throughput"] or 0 for p in points]
    axis.bar([i - width / 2 for i in x], a, width, color=COLORS["A"], label=_server_name(doc, "A"))
    bars = axis.bar([i + width / 2 for i in x], b, width, color=COLORS["B"], label=_server_name(doc, "B"))
    ratios = [p["ratio"]["output_token_throughput"] for p in points]
    axis.bar_label(bars, labels=[f"{r:.2f}x" if r else "" for r in ratios], fontsize=8)
    axis.set_xticks(x, [p["label"] for p in points], fontsize=8)
    axis.set_ylabel("output tokens / s")
    axis.set_ylim(0, 1.3 * max(a + b + [1]))
    axis.set_title("Output throughput, B/A ratio on B's bars", fontsize=10)
    axis.legend(fontsize=7)
