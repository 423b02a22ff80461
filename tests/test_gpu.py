"""GPU-only checks of the engine (skipped without CUDA): CUDA-graph decode against eager, and the
engine on CUDA against transformers."""
from __future__ import annotations

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.test_engine import PROMPTS, assert_matches_transformers, greedy, run_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def top_logprobs(outs: dict) -> dict:
    return {k: torch.tensor([[v for _, v in r.top] for r in o.logprobs]) for k, o in outs.items()}


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_graph_decode_matches_eager(checkpoint_dirs, ratio):
    path = checkpoint_dirs["lite"]
    common = dict(model=path, device="cuda", dtype="float32", compression_ratio=ratio, kv_cache_bytes=64 << 20,
                  max_num_seqs=8)
    graphed = LLMEngine(EngineConfig(**common))
    assert graphed.core.runner.graphs is not None
    eager = LLMEngine(EngineConfig(**common, cuda_graphs=False))
    a, b = run_engine(graphed, PROMPTS, greedy()), run_engine(eager, PROMPTS, greedy())
    assert {k: o.token_ids for k, o in a.items()} == {k: o.token_ids for k, o in b.items()}
    for k, lp in top_logprobs(a).items():
        torch.testing.assert_close(lp, top_logprobs(b)[k], rtol=0, atol=1e-3)


def test_cuda_engine_matches_transformers(checkpoint_dirs):
    from tests.model_fixtures import load

    path = checkpoint_dirs["lite"]
    model, tokenizer = load(path)
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = LLMEngine(EngineConfig(model=path, device="cuda", dtype="float32", kv_cache_bytes=64 << 20))
    outs = run_engine(engine, PROMPTS, greedy())
    # Triton's fp32 dot runs in TF32 on the GPU: log-probs agree to ~1e-2, greedy tokens exactly.
    assert_matches_transformers(outs, model, tokenizer, atol=2e-2)


def test_bf16_engine_runs_with_graphs_at_many_batch_sizes(checkpoint_dirs):
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["qlora"], device="cuda", dtype="bfloat16",
                                    compression_ratio=0.5, kv_cache_bytes=64 << 20, max_num_seqs=48))
    prompts = [p for p in PROMPTS for _ in range(9)]  # 36 sequences: graphs of 36..48 rows with padding
    outs = run_engine(engine, prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == 20 for o in outs.values())
    # Identical prompts decode identically whatever their row in the padded graph batch.
    for i in range(len(PROMPTS)):
        same = {tuple(outs[str(j)].token_ids) for j in range(len(prompts)) if prompts[j] == PROMPTS[i]}
        assert len(same) == 1
    assert engine.stats().num_blocks_free == engine.stats().num_blocks_total


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_layer_split_over_two_gpus_matches_one(checkpoint_dirs):
    common = dict(model=checkpoint_dirs["lite"], device="cuda", dtype="float32", kv_cache_bytes=64 << 20)
    one = LLMEngine(EngineConfig(**common, cuda_graphs=False))
    two = LLMEngine(EngineConfig(**common, pipeline_parallel_size=2))
    assert {str(d) for d in two.core.runner.layer_devices} == {"cuda:0", "cuda:1"}
    a, b = run_engine(one, PROMPTS, greedy()), run_engine(two, PROMPTS, greedy())
    assert {k: o.token_ids for k, o in a.items()} == {k: o.token_ids for k, o in b.items()}
    # The same total budget, spread over two GPUs, holds the same number of tokens.
    assert abs(two.stats().kv_capacity_tokens - one.stats().kv_capacity_tokens) <= 2 * 16


def test_async_scheduling_matches_one_step_at_a_time_with_graphs(checkpoint_dirs):
    from tests.test_async_scheduling import mixed_params, run, summary

    common = dict(model=checkpoint_dirs["lite"], device="cuda", dtype="float32", kv_cache_bytes=64 << 20,
                  max_num_seqs=8, max_num_batched_tokens=24)
    params = mixed_params(stop_token=13)
    overlapped = run(LLMEngine(EngineConfig(**common)), params)
    sync = run(LLMEngine(EngineConfig(**common, async_scheduling=False)), params)
    assert summary(overlapped) == summary(sync)


def test_launching_a_step_does_not_wait_for_the_gpu(checkpoint_dirs):
    """The point of async scheduling: issuing a step (inputs, the forward or its graph replay,
    logits, sampling, copies back) never blocks the host, so it runs while the previous step
    computes. Prefill chunks, mixed steps and decode steps alike."""
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["qlora"], device="cuda", dtype="bfloat16",
                                    kv_cache_bytes=64 << 20, max_num_seqs=16, max_num_batched_tokens=40))
    runner, launch, checked = engine.core.runner, engine.core.runner.launch, []

    def strict_launch(plan):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(all(len(w.token_ids) == 1 for w in plan.work))

    runner.launch = strict_launch
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=5, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, min_tokens=4)]
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params[i % 3])
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert {o.finish_reason for o in outs.values()} == {"length"}, {o.error for o in outs.values()}
    assert sum(checked) >= 8 and not all(checked)  # decode steps, and prefill chunks beside them
