"""Writing a session's files: results.json and the CSVs first (they are the data), then the plots
and the Markdown report drawn from the same document."""
from __future__ import annotations

import sys
from pathlib import Path

from loadtest.plots import write_plots
from loadtest.report_md import render_report
from loadtest.results import ResultStore


def write_outputs(store: ResultStore, plots: bool = True) -> dict:
    doc = store.save()
    write_report(doc, store.out_dir, plots)
    return doc


def write_report(doc: dict, out_dir: Path, plots: bool = True) -> None:
    written: list[str] = []
    if plots:
        try:
            written = write_plots(doc, out_dir)
        except Exception as exc:  # noqa: BLE001 - a plot must never cost the data or the report
            print(f"kvsplice-loadtest: warning: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    (Path(out_dir) / "report.md").write_text(render_report(doc, written))
