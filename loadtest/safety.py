"""Only loopback targets unless the user says otherwise: a load test aimed at the wrong host is an attack."""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_NAMES = ("localhost", "localhost.")


class UnsafeTarget(ValueError):
    """The URL is malformed or names a non-loopback host without --allow-remote."""


def is_loopback(host: str) -> bool:
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False  # any other name: we do not resolve it, since DNS could say anything later


def check_target(url: str, allow_remote: bool) -> str:
    """The URL without a trailing slash, or UnsafeTarget naming the flag that would allow it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeTarget(f"not an http(s) URL with a host: {url!r}")
    if not allow_remote and not is_loopback(parts.hostname):
        raise UnsafeTarget(
            f"refusing to load-test {url}: host {parts.hostname!r} is not loopback "
            f"(127.0.0.0/8, localhost, ::1); pass --allow-remote to target another machine")
    return url.rstrip("/")
