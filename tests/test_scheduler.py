"""The scheduler's peak accounting (`peak_running`) on synthetic sequences: no model, only blocks.

The peak is what the capacity search reads after a trial, so it must count every sequence that
ran in a step, survive the engine going idle, and start again with the next busy period.
"""
from __future__ import annotations

from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence

BLOCK = 4


def make_seq(request_id: str, prompt_len: int = 4, max_tokens: int = 4) -> Sequence:
    # The scheduler never detokenizes, so no detokenizer is needed.
    return Sequence(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), None)


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 16, budget: int = 256) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), max_num_seqs, budget)


def step(scheduler: Scheduler) -> None:
    """One engine step without a model: every scheduled token is computed, each decode adds one."""
    for item in scheduler.schedule():
        item.seq.num_computed_tokens += item.num_tokens
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.output_token_ids.append(0)


def finish_all(scheduler: Scheduler) -> None:
    for seq in [*scheduler.running, *scheduler.waiting]:
        scheduler.finish(seq)


def test_peak_counts_sequences_admitted_in_one_step():
    scheduler = make_scheduler()
    for i in range(5):
        scheduler.add(make_seq(str(i)))
    assert scheduler.peak_running == 0  # nothing has run yet
    step(scheduler)
    assert scheduler.peak_running == 5


def test_peak_counts_sequences_admitted_over_several_steps():
    scheduler = make_scheduler()
    scheduler.add(make_seq("first"))
    step(scheduler)
    for i in range(3):
        scheduler.add(make_seq(str(i)))  # arrive while "first" runs: the same busy period
    step(scheduler)
    assert scheduler.peak_running == 4


def test_peak_survives_finishing_and_idling():
    scheduler = make_scheduler()
    for i in range(3):
        scheduler.add(make_seq(str(i)))
    step(scheduler)
    scheduler.finish(scheduler.running[0])
    step(scheduler)
    assert scheduler.peak_running == 3  # a high-water mark: two running now, three at the peak
    finish_all(scheduler)
    assert not scheduler.has_work()
    step(scheduler)  # an idle engine keeps stepping
    assert scheduler.peak_running == 3  # still readable after the burst has drained


def test_a_request_at_an_idle_engine_starts_a_new_busy_period():
    scheduler = make_scheduler()
    for i in range(4):
        scheduler.add(make_seq(str(i)))
    step(scheduler)
    finish_all(scheduler)
    scheduler.add(make_seq("next"))
    assert scheduler.peak_running == 0  # reset on arrival, before the new period's first step
    step(scheduler)
    assert scheduler.peak_running == 1


def test_a_request_queued_behind_work_does_not_reset_the_peak():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add(make_seq(str(i)))
    step(scheduler)
    assert (len(scheduler.running), len(scheduler.waiting), scheduler.peak_running) == (2, 1, 2)
    finish_all(scheduler)
    scheduler.add(make_seq("late"))
    step(scheduler)
    assert scheduler.peak_running == 1
    # One still waiting is work too: a request arriving then joins the current period.
    scheduler.add(make_seq("a"))
    scheduler.add(make_seq("b"))
    step(scheduler)
    assert scheduler.peak_running == 2


def test_peak_is_limited_by_kv_blocks_and_counts_after_preemption():
    # 4 blocks of 4 tokens; each sequence's 4-token prompt takes one block and its first decode
    # token a second one, so 4 fit at prefill and only 2 once they decode.
    scheduler = make_scheduler(num_blocks=4)
    for i in range(6):
        scheduler.add(make_seq(str(i)))
    step(scheduler)
    assert (len(scheduler.running), scheduler.peak_running) == (4, 4)
    step(scheduler)  # every decode needs a block: the newest are preempted
    assert scheduler.num_preemptions > 0
    assert len(scheduler.running) < 4 and scheduler.peak_running == 4
