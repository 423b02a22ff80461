"""Async scheduling (step N+1 launched before step N's tokens are back) changes when the host
works, not what the engine computes: the same tokens and log-probabilities as one step at a time,
through chunked prefill, preemption, stops, aborts and seeded sampling."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from kvsplice import get_kv_cache_size
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.model_fixtures import load

PROMPTS = [
    "To be, or not to be",
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds",
    "O",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
] * 2


def run(engine: LLMEngine, params: list[SamplingParams], abort_after: dict[str, int] | None = None) -> dict:
    """Every prompt with its params; `abort_after` aborts a request once that many steps ran."""
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), prompt, p)
    outs, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        steps += 1
        for request_id, at in (abort_after or {}).items():
            if steps == at:
                outs[request_id] = engine.abort(request_id)
    return outs


def mixed_params(stop_token: int) -> list[SamplingParams]:
    """Lengths, a stop token, min_tokens, logprobs and seeded sampling in one batch."""
    return [
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, min_tokens=5, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
    ]


def engine(path: str, asynchronous: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, device="cpu", async_scheduling=asynchronous, **kw))


def summary(outs: dict) -> dict:
    return {k: (o.token_ids, o.finish_reason, [(r.token_id, round(r.logprob, 4)) for r in o.logprobs or []])
            for k, o in outs.items()}


def a_stop_token(path: str, ratio: float = 1.0) -> int:
    """A token the model produces a few tokens into the third prompt, greedily."""
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * len(PROMPTS)
    return run(engine(path, False, kv_cache_bytes=4 << 20, compression_ratio=ratio), params)["2"].token_ids[4]


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_same_outputs_as_one_step_at_a_time(checkpoint_dirs, ratio):
    path = checkpoint_dirs["lite"]
    params = mixed_params(a_stop_token(path, ratio))
    # Small steps: prompts are prefilled in chunks while other sequences decode.
    kw = dict(kv_cache_bytes=4 << 20, compression_ratio=ratio, max_num_batched_tokens=24)
    sync, overlapped = run(engine(path, False, **kw), params), run(engine(path, True, **kw), params)
    assert summary(overlapped) == summary(sync)
    assert overlapped["2"].finish_reason == "stop" and overlapped["2"].token_ids[-1] == params[2].stop_token_ids[0]
    assert len(overlapped["3"].token_ids) >= 5


def test_same_outputs_under_preemption(checkpoint_dirs):
    path = checkpoint_dirs["lite"]
    params = mixed_params(a_stop_token(path))
    per_token = get_kv_cache_size(load(path)[0].config, dtype=torch.float32).bytes_per_token
    kw = dict(kv_cache_bytes=10 * 16 * per_token, block_size=16)  # the batch needs ~20 blocks
    sync_engine, async_engine = engine(path, False, **kw), engine(path, True, **kw)
    sync, overlapped = run(sync_engine, params), run(async_engine, params)
    assert async_engine.stats().num_preemptions_total > 0
    assert summary(overlapped) == summary(sync)
    stats = async_engine.stats()
    assert stats.num_blocks_free == stats.num_blocks_total and not async_engine.has_unfinished()


def test_abort_while_its_token_is_in_flight(checkpoint_dirs):
    path = checkpoint_dirs["lite"]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * len(PROMPTS)
    kw = dict(kv_cache_bytes=4 << 20)
    full = run(engine(path, True, **kw), params)
    eng = engine(path, True, **kw)
    cut = run(eng, params, abort_after={"1": 6, "5": 3})
    assert cut["1"].finish_reason == "abort" and cut["5"].finish_reason == "abort"
    for k in full:
        if k not in ("1", "5"):
            assert cut[k].token_ids == full[k].token_ids
    assert full["1"].token_ids[: len(cut["1"].token_ids)] == cut["1"].token_ids
    stats = eng.stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def test_tokens_in_flight_are_read_on_the_device_and_finished_requests_are_not_rescheduled(checkpoint_dirs):
    eng = engine(checkpoint_dirs["lite"], True, kv_cache_bytes=4 << 20)
    runner, filled, sampled = eng.core.runner, [0], Counter()
    fill, launch = runner._fill_from_last_step, runner.launch

    def counting_fill(input_ids, holes, request_ids):
        filled[0] += len(holes)
        fill(input_ids, holes, request_ids)

    def counting_launch(plan):
        sampled.update(w.request_id for w in plan.work if w.sample)
        return launch(plan)

    runner._fill_from_last_step, runner.launch = counting_fill, counting_launch
    lengths = [1, 2, 3, 5, 8, 13, 21, 34]
    outs = run(eng, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths])
    assert [len(outs[str(i)].token_ids) for i in range(len(lengths))] == lengths
    assert filled[0] > 0  # decode steps read the previous step's tokens on the device
    # A request that stops on its length is sampled exactly max_tokens times: never one step too many.
    assert [sampled[str(i)] for i in range(len(lengths))] == lengths
