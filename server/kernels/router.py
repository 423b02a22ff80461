"""MoE routing: softmax + top-k over the router logits, with DeepSeek's shared experts appended as
always-selected experts, so the routed-experts kernel computes routed and shared experts in one
launch.

Output contract (both functions): (weights fp32 [T, top_k + num_shared], ids int32 [same]).
Columns 0..top_k-1: the chosen routed experts, weight = their softmax probability (divided by
the chosen ones' sum when `renormalize`), times `scale` (DeepSeek's routed_scaling_factor).
Columns top_k..: ids E, E+1, ..., E+num_shared-1 with weight 1.0 (the shared experts, stored as
extra experts after the routed ones in the fused weight tensors; their output is not scaled).

`topk_softmax` (Triton + torch reference): the "greedy" router. Columns come in descending
probability; ties go to the LOWEST expert index (the reference uses a stable descending sort,
the kernel an argmax that takes the smallest index among equal maxima).
Work mapping: one program per BLOCK_T tokens; a [BLOCK_T, E_PAD] tile of logits in registers,
softmax along experts, then top_k rounds of (row max, lowest index at the max, knock it out).
T * E * 4 bytes read; T up to any size, no host syncs (graph-capturable once compiled).

`grouped_topk` (torch only): transformers' DeepseekV2TopkRouter "group_limited_greedy"
(DeepSeek-V2 full): the same torch ops in the same order, so the chosen experts and weights match
it exactly (its ties follow torch.topk, not the lowest-index rule).
"""
from __future__ import annotations

import torch
from torch import Tensor

from server.kernels.triton_utils import check_last_dim_contiguous, jit, pad_dim, tl, triton, use_triton

TILE_ELEMENTS = 2048  # logits per program: BLOCK_T = TILE_ELEMENTS / E_PAD tokens (32 at E=64)


# ----------------------------------------------------------------------------- torch

def _finish(weights: Tensor, ids: Tensor, num_experts: int, num_shared: int, renormalize: bool,
            scale: float) -> tuple[Tensor, Tensor]:
    """Renormalise and scale the routed columns, append the shared experts' columns."""
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * scale
    ids = ids.to(torch.int32)
    if num_shared:
        tokens = weights.shape[0]
        shared_ids = torch.arange(num_experts, num_experts + num_shared, dtype=torch.int32, device=ids.device)
        ids = torch.cat([ids, shared_ids.expand(tokens, num_shared)], dim=1)
        weights = torch.cat([weights, weights.new_ones(tokens, num_shared)], dim=1)
    return weights.contiguous(), ids.contiguous()


def topk_softmax_torch(logits: Tensor, top_k: int, num_shared: int = 0, renormalize: bool = False,
                       scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Reference of `topk_softmax`; ties -> lowest expert index (stable descending sort)."""
    _check(logits, top_k, num_shared)
    probs = torch.softmax(logits.float(), dim=-1)
    values, indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    return _finish(values[:, :top_k], indices[:, :top_k], logits.shape[1], num_shared, renormalize, scale)


def grouped_topk(logits: Tensor, top_k: int, n_group: int, topk_group: int, num_shared: int = 0,
                 renormalize: bool = False, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """DeepSeek-V2's group_limited_greedy routing (torch only, any device, graph-capturable):
    group score = max probability in the group, keep the best `topk_group` of `n_group` groups,
    zero the other experts' scores, top-k of what remains. Same ops as transformers."""
    _check(logits, top_k, num_shared)
    tokens, experts = logits.shape
    if experts % n_group or not 0 < topk_group <= n_group:
        raise ValueError(f"E={experts}, n_group={n_group}, topk_group={topk_group} do not fit")
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    per_group = experts // n_group
    group_scores = scores.view(tokens, n_group, per_group).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(tokens, n_group, per_group).reshape(tokens, experts)
    scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return _finish(weights, ids, experts, num_shared, renormalize, scale)


def _check(logits: Tensor, top_k: int, num_shared: int) -> None:
    if logits.dim() != 2 or not 0 < top_k <= logits.shape[1] or num_shared < 0:
        raise ValueError(f"logits {tuple(logits.shape)}, top_k={top_k}, num_shared={num_shared} do not fit")


# ----------------------------------------------------------------------------- Triton

@jit
def _select_topk(logits, rows, row_ok, w_ptr, ids_ptr, stride_w, stride_ids, scale,
                 E: tl.constexpr, TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr, RENORMALIZE: tl.constexpr,
                 E_PAD: tl.constexpr, OUT_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Softmax + top-k of a [BLOCK_T, E_PAD] logits tile (padding lanes -inf) and the stores."""
    cols = tl.arange(0, E_PAD)
    # Rows past the end are all -inf: shift by 0 so they stay finite garbage (never stored).
    row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
    p = tl.exp(logits - row_max[:, None])
    p = p / tl.where(row_ok, tl.sum(p, axis=1), 1.0)[:, None]
    p = tl.where((cols < E)[None, :], p, -1.0)  # padding lanes lose to every real probability

    out_cols = tl.arange(0, OUT_PAD)
    # Shared-expert columns are preset (weight 1, ids E..); routed columns are filled below.
    weights = tl.where(out_cols[None, :] >= TOP_K, 1.0, 0.0) + tl.zeros([BLOCK_T, OUT_PAD], tl.float32)
    ids = (E - TOP_K + out_cols[None, :]) + tl.zeros([BLOCK_T, OUT_PAD], tl.int32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        # Lowest index among the maxima: the documented tie rule.
        pick = tl.min(tl.where(p == best[:, None], cols[None, :], E_PAD), axis=1)
        weights = tl.where(out_cols[None, :] == k, best[:, None], weights)
        ids = tl.where(out_cols[None, :] == k, pick[:, None], ids)
        total += best
        p = tl.where(cols[None, :] == pick[:, None], -2.0, p)  # taken: below every candidate
    routed = out_cols[None, :] < TOP_K
    if RENORMALIZE:
        total = tl.where(row_ok, total, 1.0)  # rows past the end: no 0 / 0
        weights = tl.where(routed, weights / total[:, None], weights)
    weights = tl.where(routed, weights * scale, weights)
    mask = row_ok[:, None] & (out_cols < TOP_K + NUM_SHARED)[None, :]
    tl.store(w_ptr + rows[:, None] * stride_w + out_cols[None, :], weights, mask=mask)
    tl.store(ids_ptr + rows[:, None] * stride_ids + out_cols[None, :], ids, mask=mask)


@jit(do_not_specialize=["num_tokens"])
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, num_tokens, stride_l, stride_w, stride_ids, scale,
    E: tl.constexpr, TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr, RENORMALIZE: tl.constexpr,
    E_PAD: tl.constexpr, OUT_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    rows = rows.to(tl.int64)
    cols = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :],
                     mask=row_ok[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
    _select_topk(logits, rows, row_ok, w_ptr, ids_ptr, stride_w, stride_ids, scale,
                 E, TOP_K, NUM_SHARED, RENORMALIZE, E_PAD, OUT_PAD, BLOCK_T)


def topk_softmax(logits: Tensor, top_k: int, num_shared: int = 0, renormalize: bool = False,
                 scale: float = 1.0, impl: str | None = None) -> tuple[Tensor, Tensor]:
    """Greedy router: logits [T, E] (fp32; other float dtypes are upcast) -> (weights fp32, ids
    int32), each [T, top_k + num_shared]; see the module docstring for the contract."""
    if not use_triton(logits, impl):
        return topk_softmax_torch(logits, top_k, num_shared, renormalize, scale)
    _check(logits, top_k, num_shared)
    check_last_dim_contiguous(logits=logits)
    tokens, experts = logits.shape
    width = top_k + num_shared
    weights = torch.empty(tokens, width, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, width, dtype=torch.int32, device=logits.device)
    if tokens == 0:
        return weights, ids
    e_pad = pad_dim(experts, 16)
    block_t = max(1, min(32, TILE_ELEMENTS // e_pad))
    _topk_softmax_kernel[(triton.cdiv(tokens, block_t),)](
        logits, weights, ids, tokens, logits.stride(0), weights.stride(0), ids.stride(0), float(scale),
        E=experts, TOP_K=top_k, NUM_SHARED=num_shared, RENORMALIZE=bool(renormalize),
        E_PAD=e_pad, OUT_PAD=pad_dim(width, 2), BLOCK_T=block_t, num_warps=4,
    )
    return weights, ids


def route(x: Tensor, gate: Tensor, top_k: int, num_shared: int = 0, renormalize: bool = False,
          scale: float = 1.0, impl: str | None = None) -> tuple[Tensor, Tensor]:
    """The greedy router from the hidden states: x [T, H] (any float dtype), gate [E, H] fp32 ->
    `topk_softmax(x.float() @ gate.T, ...)`, the logits in fp32 as the checkpoint was trained.
    A fused GEMM + top-k kernel was tried and dropped: one program streams the whole 512 KB gate,
    128 us per layer at batch 1 on the H200 against ~12 us for cuBLAS plus the top-k kernel."""
    logits = torch.nn.functional.linear(x.float(), gate.float())
    return topk_softmax(logits, top_k, num_shared, renormalize, scale, impl)


__all__ = ["grouped_topk", "route", "topk_softmax", "topk_softmax_torch"]
