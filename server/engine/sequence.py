"""One request's state inside the engine core: its tokens, its progress through the cache, its blocks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from server.engine.outputs import RequestTimes, TokenLogprob
from server.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    token_ids: list[int]  # the prompt, then every generated token: one list, appended to in place
    params: SamplingParams
    arrival: float = field(default_factory=time.time)
    num_prompt_tokens: int = field(init=False)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose row is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks, registered so far
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_preemptions: int = 0
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.times = RequestTimes(arrival=self.arrival)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True until the prompt's log-probabilities have been collected (not again after preemption)."""
        return self.params.prompt_logprobs is not None and (
            self.prompt_logprobs is None or len(self.prompt_logprobs) < self.num_prompt_tokens
        )
