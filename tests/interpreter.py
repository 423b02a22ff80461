"""Run a test module's Triton checks in a child process under the CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, and pytest's process may have imported
it already, so each kernel test file runs itself as a script with the variable set."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_MISSING = 3  # the child's exit code when triton cannot be imported


def run_under_interpreter(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240
    )
    if proc.returncode == TRITON_MISSING:
        pytest.skip(f"triton cannot be imported: {proc.stdout.strip()}")
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout}\n{proc.stderr}"
    print(proc.stdout)
