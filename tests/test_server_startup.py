"""Start-up failures are one line on stderr that names the problem and the fix, and the hub fails fast.

The "hub" here is a socket on 127.0.0.1 (HF_ENDPOINT): one that refuses connections, and one that
accepts them and never answers, so nothing leaves the machine.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port

HUB_ID = "some-org/some-model"


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KVSPLICE_", "HF_"))}
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, env={**base, **(env or {})})


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("model,words", [
    ("/etc/passwd", ("is a file, not a model directory", "config.json")),
    (str(REPO_ROOT / "docs"), ("has no config.json",)),
    ("/no/such/model", ("no such file or directory", "hub id")),
])
def test_a_bad_model_path_is_one_line(model, words):
    assert_one_line(serve("--model", model, env={"HF_HUB_OFFLINE": "1"}), *words)


def test_the_model_can_be_given_as_vllm_takes_it():
    # `kvsplice serve MODEL`, as `vllm serve MODEL`: the same path, the same one-line refusal.
    assert_one_line(serve("/no/such/model", env={"HF_HUB_OFFLINE": "1"}), "/no/such/model", "no such file or directory")
    assert_one_line(serve("a-model", "--model", "another"), "MODEL 'a-model' and --model 'another' disagree")


def test_an_unknown_splice_init_is_refused_before_anything_loads():
    result = serve("--compression-ratio", "0.5", "--splice-init", "pca")
    assert_one_line(result, "splice_init", "'truncate' or 'orthogonal'")


def test_an_offline_hub_id_is_one_line_naming_the_fix(tmp_path):
    result = serve("--model", HUB_ID, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line(result, HUB_ID, "HF_HUB_OFFLINE=1", "local path")


def test_the_traceback_is_there_at_debug_level():
    result = serve("--model", "/etc/passwd", "--log-level", "debug", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kvsplice serve: cannot start: model '/etc/passwd'")


def test_a_hub_that_refuses_connections_fails_with_the_fix(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = serve("--model", HUB_ID, env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path)})
    assert_one_line(result, "cannot be reached", endpoint, "HF_HUB_OFFLINE=1")


def test_a_hub_that_never_answers_fails_after_the_probe_timeout(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = serve("--model", HUB_ID, env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path)})
    assert_one_line(result, "did not answer within 8s", "not in the local Hugging Face cache")


def test_max_model_len_beyond_the_models_positions_is_refused():
    line = assert_one_line(serve("--max-model-len", "100000", env={"HF_HUB_OFFLINE": "1"}),
                           "max_model_len", "1024")
    assert "at most 1024" in line


@pytest.mark.parametrize("max_positions,rope,limit", [
    (1024, None, 1024),
    (4096, {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}, 163840),
    (163840, {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}, 163840),  # DeepSeek-V2
    (2048, {"type": "linear", "factor": 4.0}, 8192),
    (131072, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, 131072),
])
def test_position_limit_counts_rope_scaling(max_positions, rope, limit):
    from types import SimpleNamespace

    from kvsplice.model_source import position_limit

    config = SimpleNamespace(max_position_embeddings=max_positions, rope_parameters=rope)
    assert position_limit(config)[0] == limit
