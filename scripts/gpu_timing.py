"""Timing helpers shared by the GPU check scripts (run as `python scripts/gpu_check_*.py`)."""
from __future__ import annotations

import time

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
