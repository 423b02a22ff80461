"""API keys that cannot be silently off, and which paths need one."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import httpx
import pytest

from conftest import REPO_ROOT, start_server
from server.api.launcher import warn_if_open
from server.settings import load_settings

KEY = "s3cret-key"


def serve_fails(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVSPLICE_")}
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**base, **(env or {})})


@pytest.mark.parametrize("args,env,message", [
    (("--api-key", ""), None, "api_key: is empty"),
    ((), {"KVSPLICE_API_KEY": ""}, "KVSPLICE_API_KEY is set but empty"),
    (("--api-key", "key\n"), None, "api_key: contains whitespace"),
    (("--api-key", "schlüssel"), None, "api_key: must be printable ASCII"),
])
def test_an_empty_or_unusable_key_fails_start_up(args, env, message):
    result = serve_fails(*args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_bare_api_key_line_in_the_config_file_fails(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("api_key:\nport: 9000\n")
    result = serve_fails("--config", str(config))
    assert result.returncode == 2 and "api_key: is empty in" in result.stderr


def test_a_public_address_without_a_key_is_warned_about(caplog, monkeypatch):
    monkeypatch.delenv("KVSPLICE_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="kvsplice.serve"):
        warn_if_open(load_settings(host="127.0.0.1"))
        warn_if_open(load_settings(host="0.0.0.0", api_key=KEY))
        assert not caplog.records
        warn_if_open(load_settings(host="0.0.0.0"))
    assert "without an API key" in caplog.text


@pytest.fixture(scope="module")
def keyed_server():
    with start_server("--api-key", KEY, "--metrics-require-api-key") as running:
        yield running


@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER   {KEY}"])
def test_the_bearer_scheme_is_case_insensitive(keyed_server, header):
    r = httpx.get(keyed_server.base_url + "/v1/models", headers={"Authorization": header})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x"])
def test_a_missing_or_wrong_key_is_401(keyed_server, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.get(keyed_server.base_url + "/v1/models", headers=headers)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/models/x", "/tokenizer_info",
                                  "/no/such/path"])
def test_every_path_but_the_probes_needs_the_key(keyed_server, path):
    base = keyed_server.base_url
    assert httpx.get(base + path).status_code == 401
    assert httpx.get(base + path, headers={"Authorization": f"Bearer {KEY}"}).status_code in (200, 404)
    for probe in ("/health", "/ping", "/version"):
        assert httpx.get(base + probe).status_code == 200
    assert httpx.post(base + "/tokenize", json={"prompt": "a"}).status_code == 401
