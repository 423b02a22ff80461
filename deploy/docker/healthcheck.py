#!/usr/bin/env python3
"""Container health check: exit 0 when the server's GET /health answers 200, 1 otherwise.

Used by the Dockerfile's HEALTHCHECK (the image has Python but no curl). Standard library only.
The port follows KVSPLICE_PORT, as the server does; KVSPLICE_HEALTHCHECK_URL overrides the URL.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def health_url() -> str:
    url = os.environ.get("KVSPLICE_HEALTHCHECK_URL")
    if url:
        return url
    # The server binds 0.0.0.0 in the container; loopback always reaches it from inside.
    port = os.environ.get("KVSPLICE_PORT") or "8000"
    return f"http://127.0.0.1:{port}/health"


def main() -> int:
    timeout = float(os.environ.get("KVSPLICE_HEALTHCHECK_TIMEOUT", "5"))
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:  # 4xx/5xx: the server answered, but not healthy
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, timed out, bad URL
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
