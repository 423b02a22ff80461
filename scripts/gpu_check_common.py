"""Timing and report helpers shared by the GPU check scripts (`python scripts/gpu_check_*.py`)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def bench_ms(fn, device: torch.device) -> float:
    """Median ms: triton's do_bench on the GPU (L2 flushed before each run); one run on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """CUDA graph of fn, after an eager warm-up on a side stream (compiles the kernels)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def gbps(nbytes: int, ms: float | None) -> float | None:
    return nbytes / (ms * 1e-3) / 1e9 if ms else None


def write_report(report: dict, out: Path | None, default_name: str, started: float) -> Path:
    """Write the JSON report to `out`, else to $OUT/default_name (what the device tool brings back)."""
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    path = out if out is not None else Path(os.environ.get("OUT") or ".") / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    return path
