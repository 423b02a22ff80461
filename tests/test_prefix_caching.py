"""Prefix caching: the block manager on synthetic token lists, then the engine, whose outputs must
not change when a prompt's prefix comes from the cache (ratios 1.0 and 0.5, preemption, abort)."""
from __future__ import annotations

import pytest
import torch

from kvsplice import get_kv_cache_size
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.step import PLACEHOLDER_TOKEN
from tests.model_fixtures import load

BS = 4


def filled(manager: BlockManager, tokens: list[int]) -> tuple[list[int], list[int]]:
    """A sequence's table and hashes after computing all of `tokens`."""
    table, hashes = [], []
    manager.allocate(table, len(tokens))
    manager.register(table, hashes, tokens, len(tokens), PLACEHOLDER_TOKEN)
    return table, hashes


def test_a_shared_prefix_is_found_block_by_block_and_shared():
    m = BlockManager(16, BS, enable_caching=True)
    a = list(range(10))  # blocks [0-3] [4-7] and a partial one
    table_a, _ = filled(m, a)
    hits = m.match_prefix(a[:8] + [99, 98, 97])
    assert hits == table_a[:2]
    b = []
    m.take_hits(b, hits, 11)
    assert [m.ref_counts[x] for x in hits] == [2, 2]
    assert m.query_tokens == 11 and m.hit_tokens == 8
    assert m.match_prefix([0, 1, 2, 3, 4, 5, 6, 9, 9]) == table_a[:1]  # diverges inside block 2
    assert m.match_prefix([7] + a[1:]) == []  # diverges in block 1: nothing after it counts either


def test_at_least_the_last_token_is_computed():
    m = BlockManager(16, BS, enable_caching=True)
    table, _ = filled(m, list(range(8)))
    assert m.match_prefix(list(range(8))) == table[:1]  # both blocks cached, the second recomputed
    assert m.match_prefix(list(range(9))) == table[:2]


def test_freed_blocks_stay_cached_until_needed_oldest_first():
    m = BlockManager(4, BS, enable_caching=True)
    table_a, _ = filled(m, [1] * 8)
    table_b, _ = filled(m, [2] * 8)
    m.free(table_a[:])
    m.free(table_b[:])
    assert m.num_free_blocks == 4 and m.match_prefix([2] * 9) == table_b
    new = []
    m.allocate(new, 8)  # takes the two blocks freed first: a's
    assert m.match_prefix([1] * 9) == [] and m.match_prefix([2] * 9) == table_b


def test_a_sequence_frees_its_tail_first():
    m = BlockManager(3, BS, enable_caching=True)
    table, _ = filled(m, list(range(12)))
    m.free(list(table))
    other = []
    m.allocate(other, 4)  # one block: the tail goes first
    assert other == [table[2]] and m.match_prefix(list(range(12))) == table[:2]


def test_admission_counts_cached_blocks_in_the_free_list():
    m = BlockManager(3, BS, enable_caching=True)
    table, _ = filled(m, list(range(8)))
    m.free(list(table))
    hits = m.match_prefix(list(range(12)))
    assert len(hits) == 2
    # 12 tokens = 3 blocks: 2 cached (both taken from the free list) + 1 new; 3 free in all.
    assert m.can_allocate([], 12, hits) and not m.can_allocate([], 16, hits)


def test_unknown_tokens_and_collisions_are_not_cached():
    m = BlockManager(8, BS, enable_caching=True)
    tokens = [1, 2, 3, PLACEHOLDER_TOKEN, 5, 6, 7, 8]
    table, hashes = filled(m, tokens)
    assert hashes == [] and m.match_prefix(tokens + [0]) == []
    tokens[3] = 4  # the token is known now: the chain goes on
    m.register(table, hashes, tokens, 8, PLACEHOLDER_TOKEN)
    assert m.match_prefix(tokens + [0]) == table
    m.block_tokens[table[0]] = (9, 9, 9, 9)  # what a hash collision would look like
    assert m.match_prefix(tokens + [0]) == []


def test_reset_and_disabled():
    m = BlockManager(8, BS, enable_caching=True)
    filled(m, list(range(8)))
    m.reset_prefix_cache()
    assert m.match_prefix(list(range(9))) == []
    off = BlockManager(8, BS, enable_caching=False)
    filled(off, list(range(8)))
    assert off.match_prefix(list(range(9))) == [] and not off.cached


# -- the engine (on the CPU: float32 outputs that agree to the last digit, budgets in float32 bytes)

SYSTEM = ("You are a careful assistant. Answer in one short sentence, in plain words, and never make up "
          "facts you do not know; if the question is unclear, say so. ")
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "O", "Why is the sky blue at noon?"]


def run(engine: LLMEngine, prompts: list[str], params: SamplingParams, tag: str, abort_after: int = 0) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", p, params)
    outs, steps = {}, 0
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
        steps += 1
        if steps == abort_after:
            outs[f"{tag}0"] = engine.abort(f"{tag}0")
    return outs


def two_waves(engine: LLMEngine, abort_after: int = 0) -> dict:
    """The shared prompts once to fill the cache, then again beside new questions."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    first = run(engine, [SYSTEM + q for q in QUESTIONS[:2]], params, "a")
    second = run(engine, [SYSTEM + q for q in QUESTIONS] * 2, params, "b", abort_after)
    return {k: (o.token_ids, o.finish_reason, [round(r.logprob, 4) for r in o.logprobs])
            for k, o in {**first, **second}.items()}


def idle(engine: LLMEngine) -> bool:
    blocks = engine.core.blocks
    return blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_outputs_do_not_change_when_the_prefix_is_cached(checkpoint_dirs, ratio):
    kw = dict(model=checkpoint_dirs["lite"], device="cpu", kv_cache_bytes=4 << 20, compression_ratio=ratio)
    cached, plain = LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(**kw, enable_prefix_caching=False))
    assert two_waves(cached) == two_waves(plain)
    stats = cached.stats()
    prefix_tokens = len(cached.tokenizer.encode(SYSTEM)) // 16 * 16
    assert stats.prefix_cache_hits_total >= 8 * prefix_tokens  # every second-wave prompt found it
    assert stats.prefix_cache_queries_total > stats.prefix_cache_hits_total
    assert plain.stats().prefix_cache_queries_total == 0
    # Every prompt token counts as processed, cached or not (vLLM's prompt_tokens_total).
    assert stats.prompt_tokens_total == plain.stats().prompt_tokens_total == stats.prefix_cache_queries_total
    assert idle(cached)


def test_outputs_do_not_change_under_preemption_and_abort(checkpoint_dirs):
    path = checkpoint_dirs["lite"]
    per_token = get_kv_cache_size(load(path)[0].config, dtype=torch.float32).bytes_per_token
    kw = dict(model=path, device="cpu", kv_cache_bytes=14 * 16 * per_token, block_size=16)  # a wave needs ~30 blocks
    cached, plain = LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(**kw, enable_prefix_caching=False))
    a, b = two_waves(cached, abort_after=4), two_waves(plain, abort_after=4)
    assert cached.stats().num_preemptions_total > 0 and cached.stats().prefix_cache_hits_total > 0
    assert a.pop("b0")[1] == b.pop("b0")[1] == "abort"
    assert a == b
    assert idle(cached) and idle(plain)


def test_prompt_logprobs_are_never_served_from_the_cache(checkpoint_dirs):
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], device="cpu", kv_cache_bytes=4 << 20))
    prompt = SYSTEM + QUESTIONS[0]
    run(engine, [prompt], SamplingParams(max_tokens=2, temperature=0.0), "warm")
    hits = engine.stats().prefix_cache_hits_total
    out = run(engine, [prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1), "p")["p0"]
    assert engine.stats().prefix_cache_hits_total == hits
    assert len(out.prompt_logprobs) == len(engine.tokenizer.encode(prompt))


def test_the_periodic_log_line_reports_the_hit_rate(checkpoint_dirs):
    from server.engine.stats_log import line

    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], device="cpu", kv_cache_bytes=4 << 20))
    before = engine.stats()
    two_waves(engine)
    after = engine.stats()
    text = line(after, before, elapsed=2.0)
    rate = 100 * after.prefix_cache_hits_total / after.prefix_cache_queries_total
    assert f"prefix cache hit rate {rate:.1f}%" in text
    assert f"generation throughput {after.generation_tokens_total / 2:.1f} tok/s" in text
