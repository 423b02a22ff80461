"""Settings: precedence flags > env > file > defaults, validation messages, and the CLI's exit status."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from server.engine.config import EngineConfig
from server.settings import InvalidSettings, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"KVSPLICE_{name.upper()}", raising=False)


def test_defaults():
    s = load_settings()
    assert (s.model, s.host, s.port) == ("builtin", "127.0.0.1", 8000)
    assert (s.compression_ratio, s.max_waiting_requests) == (None, 256)  # None: the splice file's, else 1.0
    assert s.tensor_parallel_size == 1 and s.api_key is None and not s.metrics_require_api_key
    assert (s.max_request_body_bytes, s.request_header_timeout_s, s.request_body_timeout_s) == (8 * 2**20, 10.0, 30.0)


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "compression_ratio: 0.5\nblock-size: 32\nport: 9000\nmax_num_seqs: 8\n"),
    (".toml", "compression_ratio = 0.5\nblock-size = 32\nport = 9000\nmax_num_seqs = 8\n"),
])
def test_precedence_flags_over_env_over_file(tmp_path, monkeypatch, suffix, text):
    config = tmp_path / f"serve{suffix}"
    config.write_text(text)
    from_file = load_settings(config=str(config))
    file_values = (from_file.compression_ratio, from_file.block_size, from_file.port, from_file.max_num_seqs)
    assert file_values == (0.5, 32, 9000, 8)

    monkeypatch.setenv("KVSPLICE_PORT", "9100")
    monkeypatch.setenv("KVSPLICE_MAX_NUM_SEQS", "4")
    from_env = load_settings(config=str(config))
    assert (from_env.port, from_env.max_num_seqs, from_env.block_size) == (9100, 4, 32)

    from_flags = load_settings(config=str(config), port="9200")  # flags arrive as text from argparse
    assert (from_flags.port, from_flags.max_num_seqs, from_flags.block_size) == (9200, 4, 32)


def test_config_file_named_by_env(tmp_path, monkeypatch):
    config = tmp_path / "serve.yml"
    config.write_text("served_model_name: from-file\n")
    monkeypatch.setenv("KVSPLICE_CONFIG", str(config))
    assert load_settings().served_model_name == ["from-file"]


def test_every_engine_setting_can_be_set():
    """A new EngineConfig field needs a setting too, or `kvsplice serve` cannot change it."""
    missing = {f.name for f in dataclasses.fields(EngineConfig)} - set(Settings.model_fields)
    assert not missing, f"add these to server/settings.py: {sorted(missing)}"


def test_engine_config_carries_engine_fields():
    s = load_settings(compression_ratio="0.5", kv_cache_bytes="64MiB", max_model_len="512", seed="3")
    config = s.engine_config()
    assert (config.compression_ratio, config.kv_cache_bytes) == (0.5, 64 * 2**20)
    assert (config.max_model_len, config.seed) == (512, 3)


@pytest.mark.parametrize("flags,message", [
    ({"compression_ratio": "0"}, "compression_ratio: must be in (0, 1]"),
    ({"compression_ratio": "1.5"}, "compression_ratio: must be in (0, 1]"),
    ({"kv_cache_memory_fraction": "2"}, "kv_cache_memory_fraction: must be in (0, 1]"),
    ({"block_size": "0"}, "block_size: must be >= 1"),
    ({"max_waiting_requests": "-1"}, "max_waiting_requests: must be >= 0"),
    ({"port": "70000"}, "port: must be in [1, 65535]"),
    ({"kv_cache_bytes": "lots"}, "kv_cache_bytes: not a byte size"),
    ({"log_level": "loud"}, "log_level:"),
    ({"max_num_seqs": "many"}, "max_num_seqs:"),
    ({"config": "/nonexistent/serve.yaml"}, "config: cannot read"),
    ({"api_key": ""}, "api_key: is empty"),
    ({"api_key": "key "}, "api_key: contains whitespace"),
    ({"seed": str(2**64)}, "seed: must be a 64-bit signed integer"),
    ({"max_request_body_bytes": "0"}, "max_request_body_bytes: must be >= 1"),
    ({"request_header_timeout_s": "0"}, "request_header_timeout_s: must be >= 0.1"),
])
def test_invalid_settings_name_the_field(flags, message):
    with pytest.raises(InvalidSettings) as info:
        load_settings(**flags)
    assert message in str(info.value)


def test_unknown_key_in_config_file(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("compresion_ratio: 0.5\n")
    with pytest.raises(InvalidSettings, match="compresion_ratio: unknown setting"):
        load_settings(config=str(config))


def test_an_empty_api_key_in_the_environment_is_refused(monkeypatch):
    """Other empty KVSPLICE_* variables are ignored (Compose passes `VAR=`); this one would open the server."""
    monkeypatch.setenv("KVSPLICE_API_KEY", "")
    monkeypatch.setenv("KVSPLICE_SERVED_MODEL_NAME", "")
    with pytest.raises(InvalidSettings, match="KVSPLICE_API_KEY is set but empty"):
        load_settings()
    assert load_settings(api_key="from-flag").api_key == "from-flag"  # a flag wins over the environment


def test_invalid_env_value_names_the_field(monkeypatch):
    monkeypatch.setenv("KVSPLICE_COMPRESSION_RATIO", "3")
    with pytest.raises(InvalidSettings, match=r"compression_ratio: must be in \(0, 1\]"):
        load_settings()


def test_cli_invalid_setting_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--compression-ratio", "1.5"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "compression_ratio: must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_has_a_flag_for_every_setting(capsys):
    from server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    serve_help = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in serve_help


def test_cli_flags_reach_the_settings(monkeypatch):
    from server import cli

    seen = {}

    def record_and_stop(**flags):
        seen.update(flags)
        raise InvalidSettings("stop before starting an engine")

    monkeypatch.setattr(cli, "load_settings", record_and_stop)
    assert cli.main(["serve", "--compression-ratio", "0.5", "--no-trust-remote-code", "--port", "1234"]) == 2
    assert seen == {"compression_ratio": "0.5", "trust_remote_code": False, "port": "1234"}


def test_vllm_names_of_settings():
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--enforce-eager", "--kv-cache-memory-bytes", "2GiB",
                                      "--dtype", "half", "--served-model-name", "a", "b"])
    flags = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    settings = Settings(**flags)
    assert settings.cuda_graphs is False and settings.kv_cache_bytes == 2 << 30 and settings.dtype == "float16"
    assert settings.served_model_name == ["a", "b"]
    assert Settings(dtype="float").dtype == "float32"
    assert Settings(served_model_name="x, y").served_model_name == ["x", "y"]
