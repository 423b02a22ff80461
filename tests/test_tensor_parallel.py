"""Tensor and expert parallelism on the CPU: real worker processes joined over gloo, each loading
its shard of a small checkpoint from disk, against the same engine on one rank.

A sharded engine must compute the same model: the same greedy tokens, the same seeded samples,
log-probabilities equal up to float32 summation order, through chunked prefill, prefix-cache hits,
preemption, aborts, prompt log-probabilities and penalties, at ratios 1.0 and 0.5.
"""
from __future__ import annotations

import pytest
import torch

from kvsplice import collect_latents, get_kv_cache_size, pca_splices, save_splices
from kvsplice.cache_layout import CacheLayout
from kvsplice.model_source import load_config
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.parallel.capacity import gpu_share, module_bytes
from server.parallel.channel import decode, encode
from server.parallel.shards import ExpertShard, VocabShard, check_shardable
from server.engine.step import SeqWork, StepPlan
from tests.model_fixtures import load
from tests.test_async_scheduling import PROMPTS, mixed_params, run

LOGPROB_ATOL = 1e-4  # float32, partial sums added in another order


@pytest.fixture(scope="module")
def half_splices(checkpoint_dirs, tmp_path_factory) -> dict[str, str]:
    """A PCA splice at ratio 0.5 per small checkpoint (calibrated on the test prompts)."""
    files = {}
    for variant, path in checkpoint_dirs.items():
        model, tokenizer = load(path)
        splices = pca_splices(collect_latents(model, [torch.tensor([tokenizer.encode(p)]) for p in PROMPTS]), 0.5)
        files[variant] = str(save_splices(tmp_path_factory.mktemp("splices") / f"{variant}.safetensors", splices, model))
    return files


def workload(stop_token: int) -> list[SamplingParams]:
    """The async-scheduling mix (lengths, stops, min_tokens, logprobs, seeded samples), with prompt
    log-probabilities and penalties on two of them."""
    params = mixed_params(stop_token)
    params[1].prompt_logprobs = 2
    params[7].repetition_penalty, params[7].frequency_penalty = 1.3, 0.4
    return params


def assert_same_outputs(one: dict, sharded: dict) -> None:
    assert one.keys() == sharded.keys()
    for key, a in one.items():
        b = sharded[key]
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason), f"request {key}"
        for ra, rb in zip(a.logprobs or [], b.logprobs or []):
            assert ra.token_id == rb.token_id
            assert abs(ra.logprob - rb.logprob) <= LOGPROB_ATOL, f"request {key}"
        for ra, rb in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
            if ra is not None:
                assert abs(ra.logprob - rb.logprob) <= LOGPROB_ATOL, f"request {key} prompt"


def run_sharded(config: EngineConfig, params, **run_kw) -> tuple[dict, dict]:
    """Outputs of `config` as it is and with its tensor-parallel settings, plus the sharded
    engine's stats; the workers are stopped and must exit cleanly."""
    sharded = LLMEngine(config)
    processes = sharded.core.workers.processes
    stage_groups = {id(layer.self_attn.tp.group) for layer in sharded.core.runner.model.layers}
    assert len(stage_groups) == config.pipeline_parallel_size
    assert len(processes) == config.tensor_parallel_size - 1 and all(p.is_alive() for p in processes)
    try:
        outs = run(sharded, params, **run_kw)
        stats = sharded.stats()
    finally:
        sharded.shutdown()
    assert all(p.exitcode == 0 for p in processes)
    return outs, stats


CASES = [  # variant, tensor_parallel_size, expert parallel, pipeline_parallel_size, ratio
    pytest.param("lite", 2, False, 1, 1.0, id="lite-tp2"),
    pytest.param("lite", 4, False, 1, 0.5, id="lite-tp4-ratio0.5"),
    pytest.param("lite", 2, True, 1, 0.5, id="lite-ep2-ratio0.5"),
    pytest.param("qlora", 4, True, 1, 1.0, id="qlora-ep4"),
    pytest.param("qlora", 2, False, 2, 0.5, id="qlora-tp2xpp2-ratio0.5"),
]


@pytest.mark.parametrize("variant,tp,ep,pp,ratio", CASES)
def test_sharded_engine_matches_one_rank(checkpoint_dirs, half_splices, variant, tp, ep, pp, ratio):
    """With pipeline_parallel_size, each rank's layers form stages with a group each (on the CPU
    the stages share the CPU: the groups are what is tested)."""
    path = checkpoint_dirs[variant]
    splice = {"splice_file": half_splices[variant]} if ratio == 0.5 else {}
    # Small steps (prompts prefill in chunks beside decodes); the prompts repeat (prefix-cache hits).
    common = dict(model=path, device="cpu", kv_cache_bytes=4 << 20, max_num_batched_tokens=24, **splice)
    probe = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * len(PROMPTS)
    params = workload(stop_token=run(LLMEngine(EngineConfig(**common)), probe)["2"].token_ids[4])
    one = run(LLMEngine(EngineConfig(**common)), params, abort_after={"7": 6})
    sharded, stats = run_sharded(EngineConfig(**common, tensor_parallel_size=tp, enable_expert_parallel=ep,
                                              pipeline_parallel_size=pp), params, abort_after={"7": 6})
    assert_same_outputs(one, sharded)
    assert sharded["7"].finish_reason == "abort" and sharded["1"].prompt_logprobs[1] is not None
    assert stats.prefix_cache_hits_total > 0 and stats.num_blocks_free == stats.num_blocks_total


def test_preemption_keeps_ranks_in_step(checkpoint_dirs):
    """A cache too small for the batch: preempted requests give their rows back on every rank."""
    path = checkpoint_dirs["lite"]
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)] * len(PROMPTS)
    per_token = get_kv_cache_size(load_config(path), dtype=torch.float32).bytes_per_token
    common = dict(model=path, device="cpu", kv_cache_bytes=12 * 16 * per_token, block_size=16)  # 12 blocks
    one = run(LLMEngine(EngineConfig(**common)), params)
    sharded, stats = run_sharded(EngineConfig(**common, tensor_parallel_size=2), params)
    assert stats.num_preemptions_total > 0
    assert_same_outputs(one, sharded)


def test_refused_before_any_worker_starts(checkpoint_dirs):
    # The small checkpoints have 4 heads: 3 ranks cannot split them.
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's 4 attention heads"):
        LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], device="cpu", tensor_parallel_size=3))


def test_a_setting_every_rank_refuses_stops_the_workers(checkpoint_dirs):
    with pytest.raises(ValueError, match="holds no block"):
        LLMEngine(EngineConfig(model=checkpoint_dirs["lite"], device="cpu", tensor_parallel_size=2, kv_cache_bytes=64))
    import torch.distributed as dist
    assert not dist.is_initialized()  # the groups are left, so another engine can start in this process


# -- what each rank holds ------------------------------------------------------------------------

def test_shards():
    assert [VocabShard.of(10, r, 4) for r in range(4)] == [
        VocabShard(0, 3, 3), VocabShard(3, 6, 3), VocabShard(6, 9, 3), VocabShard(9, 10, 3)]
    shard = ExpertShard.of(num_routed=8, num_shared=2, rank=1, size=4)
    assert (shard.routed_start, shard.routed_stop, shard.shared, shard.num_local) == (2, 4, (1,), 3)
    assert shard.local_ids(num_shared=2) == [-1, -1, 0, 1, -1, -1, -1, -1, -1, 2]
    v2 = load_config("deepseek-v2")
    check_shardable(v2, 8, expert_parallel=False)
    check_shardable(v2, 8, expert_parallel=True)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's 128 attention heads"):
        check_shardable(v2, 3, expert_parallel=False)
    with pytest.raises(ValueError, match="routed experts"):
        check_shardable(v2, 64, expert_parallel=True)  # 160 routed experts; 128 heads would split


def test_step_records_survive_the_wire():
    p = SamplingParams(max_tokens=3, prompt_logprobs=1)
    plan = StepPlan([SeqWork("a", [5, 6, 7], 0, [3], True, True, p, 0, prompt_targets=[6, 7, 9]),
                     SeqWork("b", [-1], 40, [], False, True, p, 2)], preempted=["c"], finished=["d"])
    back = decode(encode(plan))
    assert [(w.request_id, w.token_ids, w.start, w.new_blocks, w.resumed, w.sample, w.prompt_targets)
            for w in back.work] == [("a", [5, 6, 7], 0, [3], True, True, [0, 0, 0]), ("b", [-1], 40, [], False, True, None)]
    assert (back.preempted, back.finished) == (["c"], ["d"])
    assert decode(encode(None)) is None


def test_capacity_arithmetic_matches_the_engine(checkpoint_dirs):
    """gpu_share's weights are what a rank's runner really holds; the KV bytes per token are the
    same on every tensor-parallel rank and halve with two pipeline stages."""
    path = checkpoint_dirs["lite"]
    config = load_config(path)
    layout = CacheLayout.for_ratio(config, 1.0, dtype=torch.float32)
    engine = LLMEngine(EngineConfig(model=path, device="cpu", kv_cache_bytes=1 << 20, tensor_parallel_size=2,
                                    enable_expert_parallel=True))
    try:
        held = module_bytes(engine.core.runner.model)
        capacity = engine.kv_capacity_tokens
    finally:
        engine.shutdown()
    share = gpu_share(config, layout, tensor_parallel_size=2, expert_parallel=True, dtype=torch.float32)
    assert share.weight_bytes == held  # rank 0 holds the one shared expert: it is the fullest
    assert share.kv_bytes_per_token == layout.bytes_per_token
    assert capacity == share.tokens(1 << 20) // 16 * 16  # whole blocks of the same budget on each rank
    one = gpu_share(config, layout, dtype=torch.float32)
    assert one.weight_bytes > share.weight_bytes > one.weight_bytes / 2  # the latent path stays whole
    two_stages = gpu_share(config, layout, tensor_parallel_size=2, pipeline_parallel_size=2, dtype=torch.float32)
    assert two_stages.kv_bytes_per_token == layout.bytes_per_token // 2 and two_stages.num_gpus == 4


def _channel_rank(rank: int, init_method: str, plans: list[StepPlan]) -> None:
    from server.parallel.rendezvous import connect, disconnect

    _, channel = connect(rank, 2, init_method, torch.device("cpu"))
    try:
        for plan in plans + [None]:
            if rank == 0:
                channel.send(plan)
            else:
                got = channel.receive()
                assert (got is None) == (plan is None)
                if plan is not None:
                    assert [w.token_ids for w in got.work] == [w.token_ids for w in plan.work]
        assert channel.agree_min(10 + rank) == 10
    finally:
        disconnect()


def test_channel_carries_records_larger_than_its_buffer():
    """A long prefill's record outgrows the one fixed broadcast and takes a second one."""
    from server.parallel.channel import BUFFER_BYTES
    from server.parallel.rendezvous import local_init_method

    p = SamplingParams()
    long = StepPlan([SeqWork("long", list(range(100_000, 100_000 + BUFFER_BYTES // 2)), 0, [1], True, True, p, 0)])
    small = StepPlan([SeqWork("s", [7], 3, [], False, True, p, 0)])
    assert len(encode(long)) > BUFFER_BYTES > len(encode(small))
    torch.multiprocessing.spawn(_channel_rank, args=(local_init_method(), [small, long, small]), nprocs=2)


def test_plan_command_prints_what_each_gpu_holds():
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "server.cli", "plan", "--model-config", "deepseek-v2", "--tensor-parallel-size", "8,3",
           "--pipeline-parallel-size", "1,2", "--compression-ratio", "1.0,0.5", "--gpu-memory-gib", "80", "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    rows = {(r["pipeline_parallel_size"], r["compression_ratio"]): r for r in out["rows"]}
    assert set(rows) == {(1, 1.0), (1, 0.5), (2, 1.0), (2, 0.5)}  # tp 3 cannot split 128 heads
    assert any("tp 3 x pp 1" in line and "128 attention heads" in line for line in out["refused"])
    for r in rows.values():
        assert r["num_gpus"] == 8 * r["pipeline_parallel_size"]
        assert r["kv_capacity_tokens"] == r["kv_budget_bytes"] // r["kv_bytes_per_token"]
    assert rows[(2, 1.0)]["kv_bytes_per_token"] * 2 == rows[(1, 1.0)]["kv_bytes_per_token"] == 60 * 576 * 2
    assert rows[(1, 0.5)]["kv_bytes_per_token"] == 60 * (256 + 64) * 2
    assert 55e9 < rows[(1, 1.0)]["weight_bytes"] < 65e9  # 236B parameters / 8, plus what every rank keeps whole


def test_one_rank_alone_gathers_zeros_for_the_absent_ranks():
    from server.parallel.workers import Workers

    workers = Workers.alone(4)
    try:
        (tp,) = workers.tp_stages
        logits = tp.gather_to_first(torch.ones(2, 3))
        assert logits.shape == (2, 12) and logits[:, :3].eq(1).all() and logits[:, 3:].eq(0).all()
        x = torch.ones(3)
        assert tp.all_reduce(x) is x and x.eq(1).all()  # no other rank: nothing added
    finally:
        workers.stop()
