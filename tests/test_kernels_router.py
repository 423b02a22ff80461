"""topk_softmax and grouped_topk (server/kernels/router.py).

In pytest's process: the references against transformers' DeepseekV2TopkRouter ("greedy" and
"group_limited_greedy"), the shared-expert columns, renormalisation and the tie rule. In a child
process under Triton's CPU interpreter: the kernel against the reference (same ids, weights to
fp32 rounding), at odd expert counts, token counts that leave a partial tile, and ties.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so the child process (run as a script) finds `server`
    sys.path.insert(0, str(REPO_ROOT))

from tests.interpreter import run_under_interpreter  # noqa: E402
from tests.kernel_checks import assert_equal, assert_rel, run_checks  # noqa: E402

from server.kernels.router import grouped_topk, route, topk_softmax, topk_softmax_torch  # noqa: E402


def logits_for(tokens: int, experts: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * scale


def transformers_router(experts: int, top_k: int, method: str = "greedy", n_group: int = 1, topk_group: int = 1,
                        scaling: float = 1.0, hidden: int = 16, seed: int = 0):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = DeepseekV2Config(hidden_size=hidden, num_attention_heads=2, n_routed_experts=experts,
                              num_experts_per_tok=top_k, topk_method=method, n_group=n_group,
                              topk_group=topk_group, routed_scaling_factor=scaling)
    router = DeepseekV2TopkRouter(config)
    router.weight.data = torch.randn(experts, hidden, generator=torch.Generator().manual_seed(seed))
    return router


def by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns sorted by expert id: the routing as a set, whatever order top-k returned."""
    order = ids.long().argsort(dim=1)
    return weights.gather(1, order), ids.long().gather(1, order)


# ---------------------------------------------------------------- references (this process)

def test_topk_softmax_reference_matches_transformers_greedy_router():
    router = transformers_router(experts=16, top_k=4, scaling=2.5)
    hidden = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    logits, want_w, want_ids = router(hidden)
    weights, ids = topk_softmax_torch(logits, 4, scale=2.5)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (9, 4)
    got_w, got_ids = by_expert(weights, ids)
    ref_w, ref_ids = by_expert(want_w, want_ids)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=0)
    assert (weights[:, :-1] >= weights[:, 1:]).all(), "columns come in descending weight"


def test_grouped_topk_matches_transformers_group_limited_greedy_exactly():
    router = transformers_router(experts=16, top_k=3, method="group_limited_greedy", n_group=4, topk_group=2,
                                 scaling=1.5)
    hidden = torch.randn(11, 16, generator=torch.Generator().manual_seed(2))
    logits, want_w, want_ids = router(hidden)
    weights, ids = grouped_topk(logits, 3, n_group=4, topk_group=2, scale=1.5)
    assert torch.equal(ids.long(), want_ids) and torch.equal(weights, want_w)
    # Every chosen expert lies in one of the two best groups (by max probability) of its token.
    groups = logits.softmax(-1).view(11, 4, 4).max(-1).values.topk(2, dim=-1).indices
    assert all(set((ids[t] // 4).tolist()) <= set(groups[t].tolist()) for t in range(11))


def test_shared_columns_renormalize_and_scale():
    logits = logits_for(5, 8, seed=3)
    for fn in (lambda **kw: topk_softmax_torch(logits, 3, **kw),
               lambda **kw: grouped_topk(logits, 3, n_group=2, topk_group=2, **kw)):
        weights, ids = fn(num_shared=2, renormalize=True, scale=2.0)
        assert weights.shape == ids.shape == (5, 5)
        assert torch.equal(ids[:, 3:], torch.tensor([[8, 9]] * 5, dtype=torch.int32))
        assert torch.equal(weights[:, 3:], torch.ones(5, 2))
        torch.testing.assert_close(weights[:, :3].sum(1), torch.full((5,), 2.0))
        plain, plain_ids = fn()
        assert torch.equal(plain_ids, ids[:, :3])
        torch.testing.assert_close(weights[:, :3], 2.0 * plain / plain.sum(1, keepdim=True))


def test_topk_softmax_ties_go_to_the_lowest_index():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 1.0, 3.0, 1.0]])
    _, ids = topk_softmax_torch(logits, 3)
    assert ids.tolist() == [[0, 1, 2], [1, 3, 0]]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        topk_softmax_torch(logits_for(2, 4, seed=0), 5)
    with pytest.raises(ValueError):
        grouped_topk(logits_for(2, 6, seed=0), 2, n_group=4, topk_group=2)


# ---------------------------------------------------------------- Triton kernel (child process)

def test_router_kernel_under_interpreter_matches_reference():
    run_under_interpreter(__file__)


def compare(logits: torch.Tensor, top_k: int, **kw) -> None:
    weights, ids = topk_softmax(logits, top_k, impl="triton", **kw)
    want_w, want_ids = topk_softmax_torch(logits, top_k, **kw)
    what = f"T={logits.shape[0]} E={logits.shape[1]} k={top_k} {kw}"
    assert_equal(ids, want_ids, f"ids {what}")
    assert_rel(weights, want_w, 1e-6, f"weights {what}")


def check_topk_softmax_shapes() -> None:
    # E not a power of two (10, 6), V2-Lite's 64, top_k up to E; 33 and 70 tokens leave a partial
    # last tile (BLOCK_T = 2048 / E_PAD tokens per program, capped at 32).
    for seed, (tokens, experts, top_k) in enumerate(((1, 64, 6), (33, 64, 6), (70, 10, 3), (5, 6, 6), (3, 16, 1))):
        compare(logits_for(tokens, experts, seed), top_k)


def check_topk_softmax_options() -> None:
    logits = logits_for(7, 12, seed=10)
    compare(logits, 4, num_shared=2)
    compare(logits, 4, renormalize=True, scale=2.5)
    compare(logits, 4, num_shared=1, renormalize=True, scale=0.5)


def check_topk_softmax_ties_and_inputs() -> None:
    ties = torch.tensor([[0.0] * 6, [1.0, 3.0, 1.0, 3.0, 1.0, -1.0]])
    _, ids = topk_softmax(ties, 3, impl="triton")
    assert ids.tolist() == [[0, 1, 2], [1, 3, 0]], f"tie rule: {ids.tolist()}"
    wide = logits_for(4, 24, seed=11)
    compare(wide[:, 4:20], 5)  # strided rows (a view of a wider logits tensor)
    compare(logits_for(3, 8, seed=12).bfloat16(), 2)  # bf16 logits are upcast
    weights, ids = topk_softmax(logits_for(0, 8, seed=0), 2, num_shared=1, impl="triton")
    assert weights.shape == ids.shape == (0, 3)


def check_route_computes_the_logits_too() -> None:
    """route (fp32 logits, then the top-k kernel) against the same GEMM then the reference."""
    for seed, (tokens, hidden, experts, top_k, dtype) in enumerate(
            ((1, 64, 64, 6, torch.bfloat16), (9, 100, 10, 3, torch.float32), (6, 40, 16, 2, torch.bfloat16))):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, hidden, generator=gen).to(dtype)
        gate = torch.randn(experts, hidden, generator=gen) / hidden**0.5
        weights, ids = route(x, gate, top_k, num_shared=2, scale=1.5, impl="triton")
        want_w, want_ids = topk_softmax_torch(x.float() @ gate.T, top_k, num_shared=2, scale=1.5)
        what = f"route T={tokens} H={hidden} E={experts} {dtype}"
        assert_equal(ids, want_ids, f"ids {what}")
        assert_rel(weights, want_w, 1e-5, f"weights {what}")


CHECKS = [check_topk_softmax_shapes, check_topk_softmax_options, check_topk_softmax_ties_and_inputs,
          check_route_computes_the_logits_too]

if __name__ == "__main__":
    sys.exit(run_checks(CHECKS))
