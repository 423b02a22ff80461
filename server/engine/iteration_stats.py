"""Tokens per engine step, as a cumulative histogram the metrics layer can publish.

The engine does not know Prometheus: it counts here, and the API's collector turns a snapshot into
vLLM's `iteration_tokens_total` histogram at scrape time.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Powers of two up to a large prefill chunk, like vLLM's buckets for this series.
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class IterationTokens:
    """Counts of steps by tokens scheduled (prefill + decode), per upper bound."""

    buckets: tuple[int, ...] = TOKEN_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, then one for +Inf
    total_tokens: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, tokens: int) -> None:
        self.counts[bisect.bisect_left(self.buckets, tokens)] += 1
        self.total_tokens += tokens
        self.steps += 1

    def snapshot(self) -> IterationTokens:
        """A copy for a stats snapshot (cheap: it is taken after every step)."""
        copy = IterationTokens(self.buckets)
        copy.counts, copy.total_tokens, copy.steps = list(self.counts), self.total_tokens, self.steps
        return copy

    def cumulative(self) -> list[tuple[str, int]]:
        """[(upper bound as Prometheus writes it, steps with at most that many tokens)], +Inf last."""
        out, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out
