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


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kernels_match_the_torch_reference_on_cuda(kv_cache_dtype):
    """The cache write (quantize in the kernel) and the decode kernel (fp8 tiles, per-token scales)
    against the torch reference on the GPU, V2-Lite's widths at ratio 0.5, bf16. Tolerance: the
    written fp8 codes may differ by one fp8 step where the GPU's division rounds the other way
    (rare); decode outputs by bf16 rounding of p * scale (1e-2 relative)."""
    from types import SimpleNamespace

    from kvsplice.cache_layout import CacheLayout
    from server.kernels.mla_cache import mla_write_kv
    from server.kernels.mla_decode import paged_mla_decode_torch
    from server.kernels.mla_decode_triton import paged_mla_decode_triton

    dev, bf16, gen = torch.device("cuda"), torch.bfloat16, torch.Generator(device="cuda").manual_seed(0)
    shape = SimpleNamespace(kv_lora_rank=512, num_hidden_layers=1, qk_rope_head_dim=64)
    layout = CacheLayout.for_ratio(shape, 0.5, bf16, 16, kv_cache_dtype)
    tokens, heads, blocks = 300, 16, 40
    latent = torch.randn(tokens, 512, device=dev, generator=gen, dtype=bf16)
    z_raw = 3 * torch.randn(tokens, 256, device=dev, generator=gen, dtype=bf16)
    k_pe = torch.randn(tokens, 64, device=dev, generator=gen, dtype=bf16)
    q_pe = torch.randn(tokens, heads, 64, device=dev, generator=gen, dtype=bf16)
    angles = torch.rand(512, 32, device=dev, generator=gen) * 6.3
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions = torch.randint(0, 512, (tokens,), device=dev, generator=gen)
    slots = torch.randperm(blocks * 16, device=dev, generator=gen)[:tokens]
    caches, stored = [], []
    for impl in ("triton", "torch"):
        cache = layout.views(torch.zeros(blocks, 16, layout.row_size, dtype=torch.uint8, device=dev))
        stored.append(mla_write_kv(latent, k_pe, q_pe.clone(), positions, cos, sin, cache, slots, z_raw=z_raw,
                                   eps=1e-6, impl=impl))
        caches.append(cache)
    fast, ref = caches
    step = 2.0 ** -(3 if kv_cache_dtype == "fp8" else 2)  # one fp8 step, relative
    code_err = (fast.code.float() - ref.code.float()).abs() / ref.code.float().abs().clamp_min(1e-3)
    assert (code_err > 1.01 * step).sum() == 0 and (code_err > 0).float().mean() < 1e-3
    torch.testing.assert_close(fast.scale, ref.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast.rope, ref.rope, rtol=0, atol=0)

    batch = 24
    table = torch.randint(0, blocks, (batch, 20), device=dev, generator=gen, dtype=torch.int32)
    lens = torch.randint(1, 320, (batch,), device=dev, generator=gen, dtype=torch.int32)
    q_lat = torch.randn(batch, heads, 256, device=dev, generator=gen, dtype=bf16)
    q_rope = torch.randn(batch, heads, 64, device=dev, generator=gen, dtype=bf16)
    want = paged_mla_decode_torch(q_lat, q_rope, ref, table, lens, 0.07)
    got = paged_mla_decode_triton(q_lat, q_rope, ref, table, lens, 0.07)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 1e-2, rel


def test_fp8_engine_graphs_match_eager(checkpoint_dirs):
    path = checkpoint_dirs["lite"]
    common = dict(model=path, device="cuda", dtype="bfloat16", compression_ratio=0.5, kv_cache_bytes=64 << 20,
                  max_num_seqs=8, kv_cache_dtype="fp8")
    graphed = LLMEngine(EngineConfig(**common))
    assert graphed.core.runner.graphs is not None and graphed.stats().kv_cache_dtype == "fp8"
    eager = LLMEngine(EngineConfig(**common, cuda_graphs=False))
    a, b = run_engine(graphed, PROMPTS, greedy()), run_engine(eager, PROMPTS, greedy())
    assert {k: o.token_ids for k, o in a.items()} == {k: o.token_ids for k, o in b.items()}


def test_one_rank_nccl_group_inside_graphs_changes_nothing(checkpoint_dirs):
    """The tensor-parallel path on one GPU: a one-rank NCCL group's all-reduces, logits gather and
    token broadcast, captured in the decode graphs, and the step channel: the same tokens and
    log-probabilities as no group at all."""
    from server.parallel.rendezvous import connect, local_init_method
    from server.parallel.workers import Workers

    common = dict(model=checkpoint_dirs["qlora"], device="cuda", dtype="float32", kv_cache_bytes=64 << 20,
                  max_num_seqs=8)
    plain = run_engine(LLMEngine(EngineConfig(**common)), PROMPTS, greedy())
    tp_stages, channel = connect(0, 1, local_init_method(), torch.device("cuda", torch.cuda.current_device()))
    engine = LLMEngine(EngineConfig(**common), workers=Workers(tp_stages, channel))
    try:
        assert engine.core.runner.graphs is not None and engine.core.runner.tp.group is not None
        grouped = run_engine(engine, PROMPTS, greedy())
    finally:
        engine.shutdown()
    assert {k: o.token_ids for k, o in grouped.items()} == {k: o.token_ids for k, o in plain.items()}
    for k, lp in top_logprobs(grouped).items():
        torch.testing.assert_close(lp, top_logprobs(plain)[k], rtol=0, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_two_ranks_over_two_gpus_match_one(checkpoint_dirs, expert_parallel):
    common = dict(model=checkpoint_dirs["qlora"], device="cuda", dtype="float32", kv_cache_bytes=64 << 20,
                  compression_ratio=0.5, max_num_seqs=8)
    one = run_engine(LLMEngine(EngineConfig(**common)), PROMPTS, greedy())
    sharded = LLMEngine(EngineConfig(**common, tensor_parallel_size=2, enable_expert_parallel=expert_parallel))
    try:
        assert sharded.core.runner.graphs is not None
        two = run_engine(sharded, PROMPTS, greedy())
    finally:
        sharded.shutdown()
    assert {k: o.token_ids for k, o in two.items()} == {k: o.token_ids for k, o in one.items()}
    for k, lp in top_logprobs(two).items():
        torch.testing.assert_close(lp, top_logprobs(one)[k], rtol=0, atol=2e-3)  # TF32 sums in another order
