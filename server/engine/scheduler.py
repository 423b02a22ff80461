"""Continuous batching: every step picks which sequences run and how many tokens each computes.

Running sequences go first (one decode token each, or the next chunk of an unfinished prompt), in
admission order; when one needs a block and none is free, the most recently admitted sequence is
preempted (blocks freed, recomputed later from its tokens, so greedy output does not change).
Then waiting sequences are admitted first-come-first-served while the token budget, the running
limit and free blocks allow; with prefix caching a sequence starts from the cached blocks of its
longest cached prefix and computes only the rest (admission counts only the blocks it needs). Prefill and decode tokens of all of them form one flattened batch,
described to the model runner by a `StepPlan`.

`peak_running` is the most sequences running at once after admission in one step, since the
current busy period began: a busy period begins when a request arrives at a scheduler with nothing
waiting or running. It is reset there and not when the scheduler goes idle, so a reading taken
after a burst of requests has drained still tells how many of them ran together (the load
tester's capacity search reads it).
"""
from __future__ import annotations

from collections import deque

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, Status
from server.engine.step import SeqWork, StepPlan


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.peak_running = 0
        self._preempted: list[str] = []  # since the last plan
        self._finished: list[str] = []

    def add(self, seq: Sequence) -> None:
        if not self.has_work():
            self.peak_running = 0  # a new busy period
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        work: list[SeqWork] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                continue  # its last token is being sampled by the step in flight
            if self._make_room(seq, n):
                work.append(self._work(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Prompt log-probabilities need every prompt position computed: no cache for them.
            hits = [] if seq.params.prompt_logprobs is not None else self.blocks.match_prefix(seq.token_ids)
            cached = len(hits) * self.blocks.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_allocate(seq.block_table, cached + n, hits):
                break  # first-come-first-served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.take_hits(seq.block_table, hits, seq.num_prompt_tokens)
            seq.num_computed_tokens = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            work.append(self._work(seq, n, admitted=True))
            budget -= n
        self.peak_running = max(self.peak_running, len(self.running))
        plan = StepPlan(work, preempted=self._preempted, finished=self._finished)
        self._preempted, self._finished = [], []
        if plan.preempted:  # a sequence preempted and readmitted within this plan is resumed: no release
            scheduled = {w.request_id for w in work}
            plan.preempted = [r for r in plan.preempted if r not in scheduled]
        return plan

    def _work(self, seq: Sequence, n: int, admitted: bool = False) -> SeqWork:
        """The next n tokens of `seq`; an admitted sequence sends its whole table (cached blocks too)."""
        start = seq.num_computed_tokens
        new_blocks = self.blocks.allocate(seq.block_table, start + n)
        if admitted:
            new_blocks = list(seq.block_table)
        end = start + n
        targets = None
        if seq.wants_prompt_logprobs and start + 1 < seq.num_prompt_tokens:
            targets = seq.token_ids[start + 1 : min(end + 1, seq.num_prompt_tokens)]
        # Penalties look at the whole prompt: a prefix found in the cache is not computed, so send it.
        cached = seq.token_ids[:min(start, seq.num_prompt_tokens)] if admitted and seq.params.penalized else []
        return SeqWork(
            request_id=seq.request_id, token_ids=seq.token_ids[start:end], start=start, new_blocks=new_blocks,
            resumed=admitted, sample=end == seq.num_tokens, params=seq.params,
            num_output_tokens=seq.num_output_tokens, num_prompt_tokens=seq.num_prompt_tokens, prompt_targets=targets,
            cached_prompt_ids=cached,
        )

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the newest running sequences until `seq` fits; False if `seq` itself was preempted."""
        need = self.blocks.blocks_needed(seq.block_table, seq.num_computed_tokens + num_tokens)
        if need == 0:
            return True  # the common decode step: the token fits in the last block
        while need > self.blocks.num_free_blocks:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Drop the sequence's cache; it re-enters the queue first and recomputes its tokens."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.block_hashes.clear()  # its blocks may be recomputed elsewhere: hash them again then
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self._preempted.append(seq.request_id)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
        self._finished.append(seq.request_id)
