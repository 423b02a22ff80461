"""The scheduler and block manager alone, on synthetic requests (no model): admission, chunking,
preemption order, block accounting, abort, and the step records the runner gets."""
from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, Status

BLOCK = 4


def seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(name, list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=64, temperature=0.0))


def make(num_blocks: int = 16, max_seqs: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), max_seqs, budget)


def run(scheduler: Scheduler, plan, sampled_token: int = 7) -> None:
    """What the engine core does after a step: advance each sequence, append a token when sampled."""
    by_id = {s.request_id: s for s in scheduler.running}
    for w in plan.work:
        s = by_id[w.request_id]
        s.num_computed_tokens = w.end
        if w.sample:
            s.token_ids.append(sampled_token)


def test_admission_is_fcfs_and_bounded_by_budget_and_seqs():
    sch = make(max_seqs=2, budget=10)
    a, b, c = seq("a", 6), seq("b", 6), seq("c", 2)
    for s in (a, b, c):
        sch.add(s)
    plan = sch.schedule()
    # a takes 6 tokens, b gets the remaining 4 as a first chunk; c waits (two sequences at most).
    assert [(w.request_id, len(w.token_ids), w.start) for w in plan.work] == [("a", 6, 0), ("b", 4, 0)]
    assert [w.sample for w in plan.work] == [True, False]
    assert [s.request_id for s in sch.waiting] == ["c"]
    run(sch, plan)
    plan = sch.schedule()
    # a decodes one token; b's second chunk starts where the first ended.
    assert [(w.request_id, w.token_ids, w.start) for w in plan.work] == [("a", [7], 6), ("b", b.token_ids[4:6], 4)]
    assert plan.work[1].sample and not plan.work[1].resumed


def test_blocks_arrive_as_deltas():
    sch = make()
    a = seq("a", 5)
    sch.add(a)
    plan = sch.schedule()
    assert plan.work[0].resumed and len(plan.work[0].new_blocks) == 2  # 5 tokens in blocks of 4
    run(sch, plan)
    for expected_new in (0, 0, 0, 1):  # cached totals 6, 7, 8 fit in two blocks; the 9th needs a third
        plan = sch.schedule()
        assert len(plan.work[0].new_blocks) == expected_new and not plan.work[0].resumed
        run(sch, plan)
    assert len(a.block_table) == 3 == sch.blocks.num_used_blocks


def test_head_of_queue_is_not_overtaken():
    sch = make(num_blocks=3)
    big, small = seq("big", 20), seq("small", 2)
    sch.add(big)
    sch.add(small)
    plan = sch.schedule()
    assert plan.work == [] and len(sch.waiting) == 2  # big needs 5 blocks; small must wait behind it


def test_preemption_takes_the_newest_and_it_comes_back_resumed():
    sch = make(num_blocks=4, budget=100)
    old, new = seq("old", 8), seq("new", 8)  # two blocks each: the cache is full
    sch.add(old)
    sch.add(new)
    run(sch, sch.schedule())
    plan = sch.schedule()  # old needs a third block: new is preempted
    assert [w.request_id for w in plan.work] == ["old"]
    assert new.status is Status.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert plan.preempted == ["new"] and sch.num_preemptions == 1
    assert sch.waiting[0] is new
    sch.finish(old)
    plan = sch.schedule()
    assert plan.finished == ["old"]
    (w,) = plan.work
    assert w.request_id == "new" and w.resumed and w.start == 0 and len(w.token_ids) == 9
    assert sch.blocks.num_used_blocks == 3


def test_abort_frees_blocks_everywhere():
    sch = make()
    running, waiting = seq("r", 9), seq("w", 3)
    sch.add(running)
    run(sch, sch.schedule())
    sch.add(waiting)
    sch.finish(running)
    sch.finish(waiting)
    assert sch.blocks.num_free_blocks == 16 and not sch.has_work()
    assert running.status is Status.FINISHED and waiting.status is Status.FINISHED


def test_prompt_logprob_targets_cover_each_prompt_token_once():
    sch = make(budget=4)
    s = Sequence("p", list(range(10, 20)), SamplingParams(max_tokens=4, prompt_logprobs=0))
    sch.add(s)
    targets = []
    while s.num_computed_tokens < s.num_prompt_tokens:
        (w,) = sch.schedule().work
        targets += w.prompt_targets or []
        s.num_computed_tokens = w.end
    assert targets == s.token_ids[1:10]  # every prompt token after the first, scored once


def test_block_manager_refuses_what_it_cannot_hold():
    blocks = BlockManager(2, BLOCK)
    table: list[int] = []
    assert blocks.allocate(table, 8) == [0, 1]
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        blocks.allocate(table, 9)
    blocks.free(table)
    assert table == [] and blocks.num_free_blocks == 2
    with pytest.raises(ValueError, match="holds no block"):
        BlockManager(0, BLOCK)


# -- peak_running: what the capacity search reads after a trial --------------------------------

def finish_all(sch: Scheduler) -> None:
    for s in [*sch.running, *sch.waiting]:
        sch.finish(s)


def test_peak_counts_sequences_admitted_in_one_step_and_over_several():
    sch = make()
    for i in range(5):
        sch.add(seq(str(i), 4))
    assert sch.peak_running == 0  # nothing has run yet
    run(sch, sch.schedule())
    assert sch.peak_running == 5
    for i in range(5, 8):
        sch.add(seq(str(i), 2))  # arrive while the others run: the same busy period
    run(sch, sch.schedule())
    assert sch.peak_running == 8


def test_peak_survives_finishing_and_idling_and_resets_on_the_next_arrival():
    sch = make()
    for i in range(3):
        sch.add(seq(str(i), 4))
    run(sch, sch.schedule())
    sch.finish(sch.running[0])
    run(sch, sch.schedule())
    assert sch.peak_running == 3  # a high-water mark: two running now, three at the peak
    finish_all(sch)
    sch.schedule()  # an idle engine keeps stepping
    assert sch.peak_running == 3  # still readable after the burst has drained
    sch.add(seq("next", 4))
    assert sch.peak_running == 0  # reset on arrival at an idle scheduler
    run(sch, sch.schedule())
    assert sch.peak_running == 1


def test_peak_does_not_count_sequences_that_wait_for_blocks():
    sch = make(num_blocks=2)
    sch.add(seq("a", 8))  # two blocks: the whole cache
    sch.add(seq("b", 4))
    run(sch, sch.schedule())
    assert sch.peak_running == 1 and [s.request_id for s in sch.waiting] == ["b"]
