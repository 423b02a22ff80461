"""One request's state inside the engine: tokens, progress through the cache, timing marks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.outputs import RequestTimes, TokenLogprob
from server.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    arrival: float = field(default_factory=time.time)
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose latent is in the cache
    block_table: list[int] = field(default_factory=list)
    text: str = ""  # generated text (stop string cut off once found)
    emitted_text_len: int = 0  # how much of `text` has been handed out
    emitted_token_len: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_preemptions: int = 0
    generator: object | None = None  # torch.Generator for seeded sampling, made on first use
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        self.times = RequestTimes(arrival=self.arrival)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True until the prompt's log-probabilities have been collected (not again after preemption)."""
        return self.params.prompt_logprobs is not None and (
            self.prompt_logprobs is None or len(self.prompt_logprobs) < len(self.prompt_token_ids)
        )
