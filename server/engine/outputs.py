"""What the engine hands back for a request, each time it makes progress."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one token, with the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestTimes:
    """Wall-clock marks (time.time()) for the latency metrics."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str  # all generated text so far (stop string excluded)
    delta_text: str  # text added since the previous output of this request
    token_ids: list[int]  # all generated token ids so far
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token (all so far)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None (no context)
    times: RequestTimes | None = None
    num_preemptions: int = 0
