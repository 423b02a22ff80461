"""lm-evaluation-harness out of the box: `lm_eval --model local-completions` against the real
server and `lm_eval --model hf` on the same checkpoint, one small local task, the same numbers.

The task is built here from the shipped held-out text: each document is the first words of a
line, the choices its true next words and three other lines' words. Two recipes:
- `base_url=...,model=NAME`: lm-eval finds the server's tokenizer through /tokenizer_info and
  /tokenize (its remote tokenizer), so NAME needs to be no hub id. That tokenizer never adds BOS,
  so the numbers are hf's with `add_bos_token=False`.
- `...,tokenizer=PATH_OR_HUB_ID,add_bos_token=True`: lm-eval tokenizes with BOS as hf does by
  default for this tokenizer, and the numbers are hf's defaults.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvsplice.model_source import BUILTIN_MODEL_DIR
from tests.conftest import REPO_ROOT
from tests.test_server_api import MODEL

LM_EVAL = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
pytestmark = pytest.mark.skipif(LM_EVAL is None, reason="lm-eval is not installed (pip install -e '.[dev]')")

TASK = "kvsplice_heldout_mc"
DOCS = 24
HELDOUT = REPO_ROOT / "kvsplice" / "data" / "corpus" / "test.txt"


def make_task(directory: Path) -> None:
    lines = [line.split() for line in HELDOUT.read_text().splitlines() if len(line.split()) >= 14]
    rng = random.Random(0)
    picked = rng.sample(lines, DOCS + 30)
    docs = []
    for i, words in enumerate(picked[:DOCS]):
        others = [" ".join(o[8:12]) for o in rng.sample(picked[DOCS:], 3)]
        choices = [" ".join(words[8:12]), *others]
        order = rng.sample(range(4), 4)
        docs.append({"context": " ".join(words[:8]), "choices": [choices[j] for j in order], "label": order.index(0)})
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def run_lm_eval(model: str, model_args: str, tasks_dir: Path, out: Path) -> tuple[dict, list[dict]]:
    """One `lm_eval run`; its results and its per-document log-likelihoods."""
    cmd = [LM_EVAL, "run", "--model", model, "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(tasks_dir), "--output_path", str(out), "--log_samples", "--batch_size", "1",
           "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][TASK]
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tasks")
    make_task(directory)
    return directory


@pytest.mark.parametrize("served_args,hf_args", [
    ("", ",add_bos_token=False"),  # the remote tokenizer: no BOS
    (f",tokenizer={BUILTIN_MODEL_DIR},add_bos_token=True", ""),  # client-side tokenizer with BOS: hf's default
], ids=["remote-tokenizer", "bos"])
def test_local_completions_equals_hf_on_a_local_task(server, tasks, tmp_path, served_args, hf_args):
    served, served_samples = run_lm_eval(
        "local-completions", f"base_url={server.base_url}/v1/completions,model={MODEL},max_retries=1{served_args}",
        tasks, tmp_path / "served")
    direct, direct_samples = run_lm_eval(
        "hf", f"pretrained={BUILTIN_MODEL_DIR},dtype=float32{hf_args}", tasks, tmp_path / "hf")
    assert served["acc,none"] == direct["acc,none"] and served["acc_norm,none"] == direct["acc_norm,none"]
    assert len(served_samples) == len(direct_samples) == DOCS
    for a, b in zip(served_samples, direct_samples):
        got = [float(r[0][0]) for r in a["resps"]]
        want = [float(r[0][0]) for r in b["resps"]]
        assert got == pytest.approx(want, abs=1e-4), a["doc_id"]
