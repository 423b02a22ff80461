"""Bounds on what one client can hold: body size (413), body and header time (408), header size (400),
and requests with more prompts than the server holds (400). Raw sockets on 127.0.0.1 play the
clients that never finish sending."""
from __future__ import annotations

import socket

import httpx
import pytest

from conftest import start_server

BODY_LIMIT = 64 * 1024
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def limited_server():
    with start_server("--max-request-body-bytes", "64KiB", "--request-header-timeout-s", "1",
                      "--request-body-timeout-s", "1", "--max-num-seqs", "2", "--max-waiting-requests", "3") as running:
        yield running


def raw_exchange(base_url: str, data: bytes, timeout: float = 60.0) -> bytes:
    """Send `data` and nothing more; return what the server answers before it closes (or `timeout`)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(limited_server):
    head = (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (20 * 2**20))
    answer = raw_exchange(limited_server.base_url, head)  # the 20 MB never follow
    assert answer.startswith(b"HTTP/1.1 413") and b"max_request_body_bytes" in answer


def test_a_chunked_body_over_the_limit_is_413(limited_server):
    def chunks():
        for _ in range(4):
            yield b"x" * BODY_LIMIT  # no Content-Length: counted as it arrives

    r = httpx.post(limited_server.base_url + "/generate", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 413 and "max_request_body_bytes" in r.json()["error"]["message"]


def test_headers_that_never_end_are_timed_out(limited_server):
    answer = raw_exchange(limited_server.base_url, b"POST /generate HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    assert answer.startswith(b"HTTP/1.1 408") and b"headers not received" in answer


def test_a_connection_that_sends_nothing_is_timed_out(limited_server):
    assert raw_exchange(limited_server.base_url, b"").startswith(b"HTTP/1.1 408")


def test_a_body_that_never_ends_is_timed_out(limited_server):
    head = (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": "')
    answer = raw_exchange(limited_server.base_url, head)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_body_timeout_s" in answer


def test_a_header_block_over_16_kib_is_refused(limited_server):
    """h11 refuses a header block that is still incomplete past 16 KiB."""
    answer = raw_exchange(limited_server.base_url, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000)
    assert answer.startswith(b"HTTP/1.1 400")


def test_more_prompts_than_the_server_holds_is_400_and_a_list_that_fits_is_served(limited_server):
    base = limited_server.base_url
    too_many = httpx.post(base + "/generate", json={"prompt": ["x"] * 6, "max_tokens": 1}, timeout=TIMEOUT)
    assert too_many.status_code == 400, too_many.text
    assert "send at most 5" in too_many.json()["error"]["message"]
    fits = httpx.post(base + "/generate", json={"prompt": ["x"] * 5, "max_tokens": 2, "ignore_eos": True},
                      timeout=TIMEOUT)
    assert fits.status_code == 200 and [len(r["token_ids"]) for r in fits.json()] == [2] * 5


def test_the_server_serves_after_the_bad_clients(limited_server):
    assert httpx.get(limited_server.base_url + "/health").status_code == 200
    r = httpx.post(limited_server.base_url + "/generate", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True},
                   timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["token_ids"]) == 3
