"""The scheduler's step records, from the first rank to the others.

The scheduler lives in one process (the first rank's); every step it broadcasts the `StepPlan`
the first rank is about to run, and every other rank runs the same plan on its shard: the same
block-table updates, the same flattened batch, the same collectives in the same order. A worker
needs less of each sequence than the first rank (no sampling parameters: only the first rank
samples), so the record is cut down to what a worker reads, pickled, and sent in one broadcast of
a fixed buffer (a second one only when a record outgrows it, a long prefill's token ids).

The group is gloo's over the same processes as the model's group, so records travel on the CPU
and never wait for a GPU. Its timeout is long: a worker waits on it while the server is idle.
"""
from __future__ import annotations

import pickle

import numpy as np
import torch
import torch.distributed as dist

from server.engine.step import SeqWork, StepPlan

BUFFER_BYTES = 1 << 16
_HEADER = 8  # int64 length of the pickled record
STOP = None  # the record that ends a worker's loop

# What a worker reads of a SeqWork (the rest is the first rank's business).
WireWork = tuple[str, list[int], int, list[int], bool, bool, int]


def encode(plan: StepPlan | None) -> bytes:
    if plan is None:
        return pickle.dumps(STOP)
    work: list[WireWork] = [(w.request_id, w.token_ids, w.start, w.new_blocks, w.resumed, w.sample,
                             len(w.prompt_targets or ())) for w in plan.work]
    return pickle.dumps((work, plan.preempted, plan.finished), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> StepPlan | None:
    record = pickle.loads(data)
    if record is STOP:
        return None
    work, preempted, finished = record
    return StepPlan([_seq_work(*w) for w in work], preempted, finished)


def _seq_work(request_id: str, token_ids: list[int], start: int, new_blocks: list[int], resumed: bool,
              sample: bool, num_prompt_targets: int) -> SeqWork:
    # Prompt targets only count here: a worker computes those rows' logit slices, the first rank scores them.
    targets = [0] * num_prompt_targets if num_prompt_targets else None
    return SeqWork(request_id, token_ids, start, new_blocks, resumed, sample, params=None, num_output_tokens=0,
                   prompt_targets=targets)


class StepChannel:
    def __init__(self, group: dist.ProcessGroup, rank: int) -> None:
        self.group, self.rank = group, rank
        self.source = dist.get_global_rank(group, 0)
        self.buffer = torch.zeros(BUFFER_BYTES, dtype=torch.uint8)

    def send(self, plan: StepPlan | None) -> None:
        """The first rank: `plan` to every other rank (None: stop)."""
        self._broadcast(encode(plan))

    def receive(self) -> StepPlan | None:
        """Another rank: the next plan (None: stop). Blocks until the first rank sends one."""
        return decode(self._broadcast(None))

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks (each rank's cache must hold the same blocks)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def _broadcast(self, data: bytes | None) -> bytes:
        """The first rank's `data` on every rank (the others pass None)."""
        buffer, room = self.buffer, BUFFER_BYTES - _HEADER
        if data is not None:
            buffer[:_HEADER].view(torch.int64)[0] = len(data)
            if len(data) <= room:
                buffer[_HEADER:_HEADER + len(data)].numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        dist.broadcast(buffer, src=self.source, group=self.group)
        length = int(buffer[:_HEADER].view(torch.int64)[0])
        if length > room:  # a second broadcast of the whole record
            big = (torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) if data is not None
                   else torch.empty(length, dtype=torch.uint8))
            dist.broadcast(big, src=self.source, group=self.group)
            return data if data is not None else big.numpy().tobytes()
        return data if data is not None else buffer[_HEADER:_HEADER + length].numpy().tobytes()
