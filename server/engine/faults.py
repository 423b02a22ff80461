"""Fault injection, for the tests of fault isolation against a real server.

`KVSPLICE_INJECT_FAULT="sample:4242,loop:4343"` makes requests whose `seed` is 4242 fail while
being sampled, and a request with seed 4343 crash the engine loop. The seed is only a tag here:
greedy requests ignore it for sampling, so any request can carry one. Unset (always, outside
tests) every check is one dict lookup on an empty dict.
"""
from __future__ import annotations

import os

ENV_VAR = "KVSPLICE_INJECT_FAULT"
POINTS = ("sample", "detokenize", "output", "forward", "loop")


class InjectedFault(RuntimeError):
    """Raised where a test asked for a failure."""


def parse(spec: str) -> dict[str, int]:
    faults: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, seed = item.partition(":")
        if point not in POINTS or not seed.lstrip("-").isdigit():
            raise ValueError(f"{ENV_VAR}: {item!r} is not POINT:SEED with POINT one of {', '.join(POINTS)}")
        faults[point] = int(seed)
    return faults


_FAULTS = parse(os.environ.get(ENV_VAR, ""))


def check(point: str, seed: int | None) -> None:
    """Raise InjectedFault if a fault was asked for at `point` for requests with this seed."""
    if _FAULTS and seed is not None and _FAULTS.get(point) == seed:
        raise InjectedFault(f"injected {point} fault ({ENV_VAR})")
