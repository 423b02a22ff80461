"""The whole engine with every Triton kernel (norms, router, cache write, experts, MLA decode), run
by Triton's CPU interpreter, against the same engine on the plain-torch path: the kernels are wired
into the model with the right views, strides and dtypes. Mixed steps (chunked prefill beside
decode) are included. The GPU repeats this at full speed (tests/test_gpu.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interpreter import REPO_ROOT, TRITON_MISSING

PROMPTS = ["To be, or not to be", "Now is the winter of our discontent made glorious summer"]


def generate(path: str, ratio: float, backend: str, kv_cache_dtype: str) -> list[dict]:
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(path, kv_cache_bytes=2 << 20, compression_ratio=ratio, attention_backend=backend,
              kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=16)  # small: the second prompt is chunked while the first decodes
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3))
    return [{"tokens": o.token_ids, "logprobs": [r.logprob for r in o.logprobs]} for o in outs]


@pytest.mark.parametrize("ratio,kv_cache_dtype", [(1.0, "auto"), (0.5, "auto"), (0.5, "fp8")])
def test_engine_on_triton_kernels_matches_torch_path(checkpoint_dirs, ratio, kv_cache_dtype):
    path = checkpoint_dirs["lite"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "KVSPLICE_FORCE_TRITON": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, __file__, path, str(ratio), kv_cache_dtype], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == TRITON_MISSING:
        pytest.skip("triton cannot be imported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    triton_run = json.loads(proc.stdout.strip().splitlines()[-1])
    torch_run = generate(path, ratio, "torch", kv_cache_dtype)
    for got, want in zip(triton_run, torch_run):
        assert got["tokens"] == want["tokens"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < 1e-3


if __name__ == "__main__":
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit(TRITON_MISSING)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(generate(sys.argv[1], float(sys.argv[2]), "triton", sys.argv[3])))
