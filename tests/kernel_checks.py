"""Shared pieces of the tests/test_kernels_*.py files.

Each of those files holds plain pytest tests (torch references against independent
implementations, run in pytest's process) and a list of interpreter checks: plain functions
that call the Triton kernels on CPU tensors. The pytest test `test_..._under_interpreter` runs
the file as a script in a child process with TRITON_INTERPRET=1 (tests/interpreter.py), whose
`__main__` hands the list to `run_checks` here.
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Callable

import torch

from tests.interpreter import TRITON_MISSING

# bf16 relative error allowed between two computations that round differently (about 2**-8);
# where the kernel and the reference round identically the checks demand exact equality.
BF16_TOL = 1e-2
FP32_TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; inf when got holds a NaN or inf (unwritten output)."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:g}"


def assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}")
    diff = (got.double() - want.double()).abs()
    assert torch.equal(got, want), f"{what}: {int((got != want).sum())} elements differ, max {diff.max().item():.3e}"


def tol_for(dtype: torch.dtype) -> float:
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


def run_checks(checks: list[Callable[[], None]]) -> int:
    """Child-process entry point: every check, one line each; exit code 1 if any failed."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from server.kernels import triton_utils

    if not triton_utils.HAS_TRITON:
        print("triton is not installed")
        return TRITON_MISSING
    # torch.empty then fills floats with NaN (and ints with their max): an output element a kernel
    # leaves unwritten shows up as NaN in the comparison.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    failures = 0
    for check in checks:
        start = time.perf_counter()
        try:
            check()
        except Exception:  # noqa: BLE001 - every failure is reported, the others still run
            failures += 1
            print(f"FAIL {check.__name__}\n{traceback.format_exc()}")
        else:
            print(f"ok   {check.__name__} ({time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0
