"""fused_experts (server/kernels/fused_moe.py): alignment, grouped GEMMs, sum; configs; CPU path.

In pytest's process: the fp32 reference against transformers' DeepseekV2Experts, the router plus
shared experts fused as extra experts against transformers' whole DeepseekV2Moe, the fast CPU
path against the reference, the config table (nearest bucket at or above T, a device's JSON file
overriding the defaults) and a dry run of scripts/gpu_bench_kernels.py. In a child process under
Triton's CPU interpreter: the alignment kernels against a torch sort, and the whole Triton path
against the reference (T = 1, T not a multiple of BLOCK_M, experts never hit, out-of-range ids,
odd H and I, both alignment paths, bf16).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so the child process (run as a script) finds `server`
    sys.path.insert(0, str(REPO_ROOT))

from tests.interpreter import run_under_interpreter  # noqa: E402
from tests.kernel_checks import assert_equal, assert_rel, run_checks, tol_for  # noqa: E402

from server.kernels import fused_moe as fm  # noqa: E402
from server.kernels.fused_moe import GemmTile, MoEConfig  # noqa: E402
from server.kernels.router import topk_softmax  # noqa: E402

TINY = MoEConfig(16, GemmTile(16, 16), GemmTile(16, 32))  # interpreter-sized tiles


@dataclass
class MoECase:
    x: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, K]
    w: torch.Tensor  # [T, K] fp32
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]


def make_case(tokens: int, experts: int = 8, top_k: int = 2, hidden: int = 64, inter: int = 48,
              dtype: torch.dtype = torch.float32, seed: int = 0, shared: tuple[int, ...] = (3,),
              pool: int | None = None, id_dtype: torch.dtype = torch.int64) -> MoECase:
    """Every token routes to the experts in `shared` and to distinct random others drawn from the
    first `pool` experts (default all), as a top-k router with shared experts would."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(tokens, top_k, dtype=torch.long)
    for t in range(tokens):
        others = [e for e in torch.randperm(pool or experts, generator=gen).tolist() if e not in shared]
        ids[t] = torch.tensor((list(shared) + others)[:top_k])
    return MoECase(
        x=torch.randn(tokens, hidden, generator=gen).to(dtype), ids=ids.to(id_dtype),
        w=torch.rand(tokens, top_k, generator=gen) + 0.1,
        w13=(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype),
        w2=(torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype),
    )


def transformers_experts(case: MoECase) -> nn.Module:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

    experts, two_inter, hidden = case.w13.shape
    config = DeepseekV2Config(hidden_size=hidden, num_attention_heads=2, moe_intermediate_size=two_inter // 2,
                              n_routed_experts=experts, num_experts_per_tok=case.ids.shape[1], hidden_act="silu",
                              experts_implementation="eager")
    module = DeepseekV2Experts(config)
    module.gate_up_proj = nn.Parameter(case.w13, requires_grad=False)
    module.down_proj = nn.Parameter(case.w2, requires_grad=False)
    return module


# ---------------------------------------------------------------- references (this process)

def test_reference_matches_transformers_eager_experts():
    for tokens, seed in ((1, 0), (3, 1), (9, 2)):
        case = make_case(tokens, seed=seed)
        want = transformers_experts(case)(case.x, case.ids, case.w)
        got = fm.fused_experts_torch(case.x, case.ids, case.w, case.w13, case.w2)
        assert got.shape == case.x.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reference_skips_out_of_range_ids_like_transformers():
    case = make_case(4, seed=3)
    case.ids[1, 1] = 8  # == E: transformers' eager experts skip it
    want = transformers_experts(case)(case.x, case.ids, case.w)
    torch.testing.assert_close(fm.fused_experts_torch(case.x, case.ids, case.w, case.w13, case.w2), want,
                               rtol=1e-5, atol=1e-6)
    case.ids[2, 0] = -1  # an expert-parallel sentinel: also nothing
    got = fm.fused_experts_torch(case.x, case.ids, case.w, case.w13, case.w2)
    keep = torch.ones_like(case.w)
    keep[1, 1] = keep[2, 0] = 0
    clean = case.ids.clamp(0, 7)
    torch.testing.assert_close(got, fm.fused_experts_torch(case.x, clean, case.w * keep, case.w13, case.w2))


def test_router_plus_shared_experts_as_extra_experts_match_transformers_moe():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    config = DeepseekV2Config(hidden_size=32, num_attention_heads=2, moe_intermediate_size=16, n_routed_experts=8,
                              num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=1.5,
                              hidden_act="silu", experts_implementation="eager")
    moe = DeepseekV2Moe(config).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    x = torch.randn(7, 32, generator=gen)
    with torch.no_grad():
        want = moe(x[None])[0]
        logits = nn.functional.linear(x, moe.gate.weight)
        w13, w2 = fm.append_shared_experts(moe.experts.gate_up_proj, moe.experts.down_proj,
                                           moe.shared_experts.gate_proj.weight, moe.shared_experts.up_proj.weight,
                                           moe.shared_experts.down_proj.weight, num_shared=2)
        weights, ids = topk_softmax(logits, 3, num_shared=2, scale=1.5)
        got = fm.fused_experts(x, ids, weights, w13, w2)
    assert w13.shape == (10, 32, 32) and w2.shape == (10, 32, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_fast_path_matches_reference(dtype):
    for tokens, kw in ((1, {}), (37, dict(experts=16, top_k=6, hidden=40, inter=24, shared=(0, 7))),
                       (5, dict(pool=3, id_dtype=torch.int32))):  # experts 3..7 never hit
        case = make_case(tokens, dtype=dtype, seed=tokens, **kw)
        case.ids[0, -1] = -1 if tokens > 1 else case.w13.shape[0]  # dropped pairs
        want = fm.fused_experts_torch(case.x, case.ids, case.w, case.w13, case.w2)
        got = fm.fused_experts(case.x, case.ids, case.w, case.w13, case.w2)
        assert got.dtype == dtype
        assert_rel(got, want, 1e-6 if dtype == torch.float32 else 1e-2, f"looped T={tokens} {dtype}")


def test_config_table_picks_the_nearest_bucket_at_or_above():
    table = fm.DEFAULT_CONFIGS
    assert fm.get_config(1) == table[1] and fm.get_config(3) == table[4] and fm.get_config(100) == table[128]
    assert fm.get_config(300) == table[512] and fm.get_config(16384) == table[4096]  # past the end: largest
    # The fact sheet's 128/256 tile (gate and up columns in separate programs) is 128 x (2 x 64) here.
    assert table[512] == MoEConfig(128, GemmTile(128, 64, 1, 8, 4), GemmTile(256, 64, 1, 8, 4))
    assert MoEConfig.from_dict(table[2].to_dict()) == table[2]


def test_a_device_json_overrides_the_defaults(tmp_path, monkeypatch):
    custom = MoEConfig(32, GemmTile(32, 64, 4, 4, 3), GemmTile(64, 64, 4, 4, 3))
    (tmp_path / "fused_moe_test.json").write_text(json.dumps(
        dict(device="Test GPU", configs={"1": custom.to_dict(), "64": fm.DEFAULT_CONFIGS[64].to_dict()})))
    (tmp_path / "broken.json").write_text("{not json")  # ignored, never fatal
    monkeypatch.setattr(fm, "CONFIG_DIR", tmp_path)
    monkeypatch.delenv(fm.CONFIG_ENV, raising=False)
    fm._table_for_device.cache_clear()
    try:
        assert fm._table_for_device("Test GPU", None)[1] == custom
        assert fm._table_for_device("Other GPU", None) is fm.DEFAULT_CONFIGS
        assert fm._table_for_device(None, str(tmp_path / "fused_moe_test.json"))[1] == custom  # env override
        assert fm.get_config(5) == fm.DEFAULT_CONFIGS[8]  # on CPU (no device name): the defaults
    finally:
        fm._table_for_device.cache_clear()


def test_padded_bound_covers_the_worst_case():
    # Every hit expert wastes at most BLOCK_M - 1 slots, and at most min(E, pairs) experts are hit.
    assert fm.max_padded_pairs(8, 66, 16) == 8 + 8 * 15
    assert fm.max_padded_pairs(8 * 4096, 66, 128) == 8 * 4096 + 66 * 127


def test_gpu_bench_script_dry_run(tmp_path):
    """scripts/gpu_bench_kernels.py end to end on the interpreter (tiny sizes): every row passes
    and the config table it writes loads."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "scripts/gpu_bench_kernels.py", "--dry-run", "--tokens", "1,40",
                           "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert all(r["ok"] for r in report["small_kernels"] + report["moe"])
    device, table = fm.load_config_file(tmp_path / "fused_moe_h200.json")
    assert device == "cpu-dry-run" and sorted(table) == [1, 40]


# ---------------------------------------------------------------- Triton kernels (child process)

def test_moe_kernels_under_interpreter_match_reference():
    run_under_interpreter(__file__)


def expected_alignment(ids: torch.Tensor, experts: int, block_m: int) -> tuple[list[int], list[list[int]]]:
    """Per expert (ascending) its pairs in pair order; the padded total."""
    flat = ids.reshape(-1).tolist()
    lists = [[p for p, e in enumerate(flat) if e == expert] for expert in range(experts)]
    total = sum(-(-len(pairs) // block_m) * block_m for pairs in lists)
    return [total], lists


def check_alignment(ids: torch.Tensor, experts: int, block_m: int, what: str) -> None:
    align = fm.moe_align(ids, experts, block_m)
    (total,), lists = expected_alignment(ids, experts, block_m)
    assert align.num_padded.item() == total, f"{what}: padded total {align.num_padded.item()} != {total}"
    sentinel = ids.numel()
    sorted_ids, owners = align.sorted_ids[:total].tolist(), align.expert_ids.tolist()
    position = 0
    for expert, pairs in enumerate(lists):
        padded = -(-len(pairs) // block_m) * block_m
        got = sorted_ids[position:position + padded]
        assert got == pairs + [sentinel] * (padded - len(pairs)), f"{what}: expert {expert} rows {got}"
        blocks = owners[position // block_m:(position + padded) // block_m]
        assert blocks == [expert] * (padded // block_m), f"{what}: expert {expert} blocks {blocks}"
        position += padded
    assert all(o == -1 for o in owners[total // block_m:]), f"{what}: blocks past the total must be -1"


def check_alignment_small_and_large_paths() -> None:
    gen = torch.Generator().manual_seed(0)
    for tokens, top_k, experts, block_m in ((1, 8, 66, 16), (3, 2, 8, 16), (70, 4, 8, 16), (90, 6, 13, 32),
                                            (40, 8, 66, 64)):
        ids = torch.randint(-1, experts + 2, (tokens, top_k), generator=gen)  # includes dropped ids
        path = "small" if ids.numel() <= fm.SMALL_ALIGN_PAIRS else "large"
        check_alignment(ids, experts, block_m, f"{path} path T={tokens} K={top_k} E={experts} BM={block_m}")
        check_alignment(ids.int(), experts, block_m, f"int32 ids, T={tokens}")


# (name, make_case kwargs, config): each row exercises one path of the kernels.
CASES = [
    ("T=1", dict(tokens=1), TINY),
    ("T=3, expert 3 in every token", dict(tokens=3), TINY),
    ("T=3 bf16", dict(tokens=3, dtype=torch.bfloat16), TINY),
    ("T=2 fp16", dict(tokens=2, dtype=torch.float16), TINY),
    ("20 tokens on 2 experts (> BLOCK_M)", dict(tokens=20, shared=(1, 5)), TINY),
    ("K=6 of E=16, odd H/I, BLOCK_K not dividing H", dict(tokens=3, experts=16, top_k=6, hidden=40, inter=24,
                                                          shared=(0, 7)), MoEConfig(16, GemmTile(16, 32), GemmTile(32, 16))),
    ("experts never hit, int32 ids", dict(tokens=5, experts=12, pool=4, id_dtype=torch.int32), TINY),
    ("large alignment path, BLOCK_M 32, GROUP_M 4", dict(tokens=70, top_k=4, hidden=48, inter=32),
     MoEConfig(32, GemmTile(16, 16, 4), GemmTile(32, 16, 4))),
    ("the default table's config", dict(tokens=4, experts=8, top_k=3, hidden=40, inter=24, shared=()), None),
]


def check_fused_experts_cases() -> None:
    for seed, (name, kwargs, cfg) in enumerate(CASES):
        case = make_case(seed=seed, **kwargs)
        want = fm.fused_experts_torch(case.x, case.ids, case.w, case.w13, case.w2)
        got = fm.fused_experts(case.x, case.ids, case.w, case.w13, case.w2, config=cfg, impl="triton")
        assert got.dtype == case.x.dtype, name
        assert_rel(got, want, tol_for(case.x.dtype), name)


def check_out_of_range_ids_and_buffers() -> None:
    case = make_case(4, seed=30)
    ids, w = case.ids.clone(), case.w.clone()
    ids[1, 1], ids[3, 0] = -1, 8  # dropped: contribute nothing
    x = torch.randn(4, 64 + 7)[:, :64]  # strided rows
    out = torch.full((4, 64), float("nan"))
    got = fm.fused_experts(x, ids, case.w, case.w13, case.w2, config=TINY, out=out, impl="triton")
    assert got is out
    w[1, 1] = w[3, 0] = 0.0
    assert_rel(out, fm.fused_experts_torch(x, ids.clamp(0, 7), w, case.w13, case.w2), 1e-5, "dropped ids")
    # fp32 activations over bf16 weights: the GEMMs run in the weights' dtype, the output stays fp32.
    bf = make_case(2, seed=31, dtype=torch.bfloat16)
    x32 = bf.x.float()
    got = fm.fused_experts(x32, bf.ids, bf.w, bf.w13, bf.w2, config=TINY, impl="triton")
    assert got.dtype == torch.float32
    assert_rel(got, fm.fused_experts_torch(x32, bf.ids, bf.w, bf.w13, bf.w2), 1e-2, "fp32 x, bf16 weights")
    empty = make_case(0, seed=0)
    assert fm.fused_experts(empty.x, empty.ids, empty.w, empty.w13, empty.w2, impl="triton").shape == (0, 64)


def check_stages_compose() -> None:
    """The stage API the GPU script tunes with gives the same result as the one-call path."""
    case = make_case(6, seed=40)
    align = fm.moe_align(case.ids, 8, 16)
    act = fm.moe_gemm_up(case.x, case.w13, 2, align, TINY.up)
    ybuf = fm.moe_gemm_down(act, case.w2, case.w, align, TINY.down, torch.float32)
    out = fm.moe_sum(ybuf, case.ids, 8, torch.empty_like(case.x))
    assert_equal(out, fm.fused_experts_triton(case.x, case.ids, case.w, case.w13, case.w2, config=TINY),
                 "staged == fused")


def check_force_env_routes_cpu_calls_to_triton() -> None:
    case = make_case(2, seed=50)
    calls = []
    original = fm.fused_experts_triton
    fm.fused_experts_triton = lambda *a, **k: calls.append(1) or original(*a, **k)
    os.environ["KVSPLICE_FORCE_TRITON"] = "1"
    try:
        got = fm.fused_experts(case.x, case.ids, case.w, case.w13, case.w2, config=TINY)
    finally:
        del os.environ["KVSPLICE_FORCE_TRITON"]
        fm.fused_experts_triton = original
    assert calls == [1], "KVSPLICE_FORCE_TRITON=1 under the interpreter takes the Triton path"
    assert_rel(got, fm.fused_experts_torch(case.x, case.ids, case.w, case.w13, case.w2), 1e-5, "forced")


CHECKS = [check_alignment_small_and_large_paths, check_fused_experts_cases, check_out_of_range_ids_and_buffers,
          check_stages_compose, check_force_env_routes_cpu_calls_to_triton]

if __name__ == "__main__":
    sys.exit(run_checks(CHECKS))
