"""Everything a session measured, kept as it goes and written to disk after every run.

`results.json` is the one source: it holds every run (summary, requests, /metrics samples as
columns), the capacity searches and the comparison. `summary.csv` (one row per run) and `requests.csv` (one row
per request) are flat views of it; the Markdown report and the plots are drawn from it too, so
all of them agree. A run that is cut short (server gone, Ctrl-C) is saved with status "partial".
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from loadtest.runner import RunResult
from loadtest.stats import SLOs, summarize

FORMAT_VERSION = 1
ROUND = 5  # decimals kept for times in seconds (10 us: far below what a network client can resolve)


# /metrics sample fields that change during a run; the cache's size and ratio are in "servers".
SAMPLE_FIELDS = ("t_s", "running", "waiting", "kv_usage", "kv_bytes_in_use", "prompt_tokens", "generation_tokens",
                 "preemptions")


class ResultStore:
    def __init__(self, out_dir: Path, mode: str, command: str, slos: SLOs, setup: dict,
                 keep_trial_requests: bool = False):
        self.out_dir = Path(out_dir)
        self.slos = slos
        # Capacity trials are many and short: by default only their summaries and samples are
        # kept, so a search's results stay small.
        self.keep_trial_requests = keep_trial_requests
        self.runs: list[RunResult] = []
        self.doc: dict = {
            "tool": "kvsplice-loadtest", "format_version": FORMAT_VERSION, "mode": mode, "command": command,
            "started_at": _now(), "finished_at": None, "status": "running", "error": None,
            "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                        "cpus": os.cpu_count(), "load_average_at_start": _load_average()},
            **setup, "slos": slos.as_dict(), "servers": {}, "capacity": {}, "comparison": None,
        }

    # ------------------------------------------------------------ filling in

    def add_server(self, label: str, info: dict) -> None:
        self.doc["servers"][label] = info

    def add_run(self, run: RunResult) -> None:
        """Called when a run starts, so that a run cut short is still saved."""
        self.runs.append(run)

    def set_capacity(self, label: str, capacity: dict) -> None:
        self.doc["capacity"][label] = capacity

    def set_comparison(self, comparison: dict) -> None:
        self.doc["comparison"] = comparison

    def finish(self, status: str = "complete", error: str | None = None) -> None:
        self.doc["status"], self.doc["error"], self.doc["finished_at"] = status, error, _now()

    # ------------------------------------------------------------ writing

    def document(self) -> dict:
        runs = []
        for run_id, run in enumerate(self.runs):
            summary = {"run_id": run_id, **summarize(run, self.slos)}
            keep = run.phase == "run" or self.keep_trial_requests
            runs.append({"summary": summary, "requests": [_request_row(r) for r in run.requests] if keep else [],
                         "requests_omitted": not keep, "samples": _sample_columns(run.samples)})
        return {**self.doc, "runs": runs}

    def save(self) -> dict:
        """Write results.json and the two CSVs; returns the document written."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        doc = self.document()
        _write_atomic(self.out_dir / "results.json", json.dumps(doc, separators=(",", ":"), default=_json_default))
        write_csvs(doc, self.out_dir)
        return doc


def summary_rows(doc: dict) -> list[dict]:
    """One flat row per run (nested summaries joined with '_': ttft_ms_p90, server_metrics_preemptions)."""
    rows = []
    for run in doc["runs"]:
        summary = dict(run["summary"])
        reasons = summary.pop("failure_reasons")
        notes = summary.pop("notes")
        row = _flatten(summary)
        row["failure_reasons"] = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        row["notes"] = "; ".join(notes)
        rows.append(row)
    return rows


def request_rows(doc: dict) -> list[dict]:
    rows = []
    for run in doc["runs"]:
        s = run["summary"]
        for request in run["requests"]:
            rows.append({"run_id": s["run_id"], "server": s["server"], "label": s["label"], "phase": s["phase"],
                         **{k: v for k, v in request.items() if k != "itl_s"}})
    return rows


def write_csvs(doc: dict, out_dir: Path) -> None:
    _write_csv(out_dir / "summary.csv", summary_rows(doc))
    _write_csv(out_dir / "requests.csv", request_rows(doc))


def _request_row(r) -> dict:
    row = dataclasses.asdict(r)
    row["tpot_s"] = r.tpot_s
    row["itl_mean_s"] = sum(r.itl_s) / len(r.itl_s) if r.itl_s else None
    return _rounded(row)


def _sample_columns(samples) -> dict[str, list]:
    """Samples as columns (field -> values in time order): a fraction of the size of one dict per sample."""
    return {name: [_rounded(getattr(s, name)) for s in samples] for name in SAMPLE_FIELDS}


def _rounded(value):
    if isinstance(value, float):
        return round(value, ROUND)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _flatten(data: dict, prefix: str = "") -> dict:
    row = {}
    for key, value in data.items():
        if isinstance(value, dict):
            row.update(_flatten(value, f"{prefix}{key}_"))
        else:
            row[prefix + key] = value
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _write_atomic(path: Path, text: str) -> None:
    # Write then rename: a crash mid-write leaves the previous complete file, never half of one.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _json_default(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load: a busy machine explains noisy latencies."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
