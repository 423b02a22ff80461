"""The plain records that cross between the scheduler, the model runner and the engine core.

The scheduler decides; the runner computes; neither sees the other's objects. A step is a list of
`SeqWork` (which tokens of which sequence, into which cache blocks); its result is the sampled
tokens. Block tables travel as deltas (the blocks added this step), so a step's host cost grows with
the batch, not with the batch times its context.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams

# A token the previous step is still sampling when this one is scheduled (async scheduling): the
# runner reads it from that step's output on the device.
PLACEHOLDER_TOKEN = -1


@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a step."""

    request_id: str
    token_ids: list[int]  # the tokens whose cache rows this step computes (the last may be PLACEHOLDER_TOKEN)
    start: int  # position of token_ids[0]
    new_blocks: list[int]  # blocks appended to the sequence's table for this step
    resumed: bool  # admitted this step (new, or back from preemption): its table is new_blocks, cached ones too
    sample: bool  # these tokens reach the end of the sequence: sample the next one
    params: SamplingParams
    num_output_tokens: int  # generated so far (min_tokens holds stop tokens back until reached)
    num_prompt_tokens: int = 0  # positions below it are the prompt (repetition_penalty looks at them)
    # An admitted penalised sequence's prompt tokens before `start` (found in the prefix cache).
    cached_prompt_ids: list[int] = field(default_factory=list)
    # Prompt log-probabilities: the prompt tokens at positions start+1 .. start+len(token_ids), each
    # scored from the position before it (None: not wanted, or the prompt is done).
    prompt_targets: list[int] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class StepPlan:
    work: list[SeqWork]
    preempted: list[str] = field(default_factory=list)  # their cache is gone; they come back resumed
    finished: list[str] = field(default_factory=list)  # gone for good since the last plan

    @property
    def num_tokens(self) -> int:
        return sum(len(w.token_ids) for w in self.work)


@dataclass(slots=True)
class Sampled:
    request_id: str
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass
class StepResult:
    sampled: list[Sampled] = field(default_factory=list)  # one per SeqWork with sample=True that succeeded
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # by request, this step's part
    failed: dict[str, str] = field(default_factory=dict)  # request -> why its sampling failed
