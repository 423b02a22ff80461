"""Routed experts of DeepSeek-V2's MoE for decode-sized batches: a torch reference and Triton kernels.

Math (transformers' `DeepseekV2Experts`): for token t and its k-th routed expert e = idx[t, k],
    h = silu(x_t @ W_gate[e]^T) * (x_t @ W_up[e]^T)        gate_up[e] = [W_gate; W_up]  [2I, H]
    y_t = sum_k w[t, k] * (h @ down[e]^T)                   down[e]                      [H, I]

Why Triton: at decode a step reads the weights of the experts its tokens selected and almost
nothing else, so the experts should run at memory bandwidth; transformers' grouped_mm path is far
from that at batch 1 (docs/design.md section 5).

Work mapping (grouped by expert, so every selected expert's weights are read ONCE per call,
however many of the T*K (token, k) pairs picked it):
  1. `_route_kernel` (one program): sorts the pairs by expert on the device. Writes `sorted_pair`
     (pair ids grouped by expert) and per *slot* (the s-th distinct selected expert) its expert
     id, first sorted position and pair count. There are S = min(T*K, E) slots, a bound that
     only depends on T, so launch shapes are fixed; slots past the number of distinct experts
     get count 0 and their programs do nothing.
  2. `_gate_up_kernel`, grid (cdiv(I, BLOCK_N), S): a program owns BLOCK_N gate rows and the
     matching BLOCK_N up rows of its slot's expert (so silu(gate) * up fuses in registers),
     streams them over H in BLOCK_H chunks and multiplies them with the expert's tokens,
     BLOCK_M (16, tl.dot's minimum) at a time. Writes act [T*K, I] in sorted order.
  3. `_down_kernel`, grid (cdiv(H, BLOCK_N), S): the same for down rows, reducing over I, times
     the routing weight; writes a per-pair fp32 row ybuf [T*K, H] (by original pair id, no atomics).
  4. `_sum_k_kernel`, grid (T, cdiv(H, BLOCK)): out[t] = sum_k ybuf[t*K + k], in x's dtype.
  At T=1 on V2-Lite (K=6, I=1408, H=2048) that is 6 x 88 gate_up programs (128 KB of weights
  each) and 6 x 64 down programs: several per SM on 132 SMs.

No host syncs and no data-dependent shapes (only T, K and the weight shapes set the launch), so
a call can be captured in a CUDA graph. Triton compiles on the first call: run one eagerly first.
Default tiles (MoELaunchConfig) were chosen from sm_90 compiles (no spills; gate_up fits 3 programs/SM in
shared memory), not yet from timings: scripts/gpu_check_moe.py sweeps them.
bf16 weights, fp32 accumulation; the intermediate h is rounded to the weight dtype before the
down projection (as transformers does), everything else stays fp32 until the output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: FusedMoEExperts always uses the wrapped module
    triton = tl = None

# Above this many tokens FusedMoEExperts calls transformers' experts. Weights are read once per
# selected expert at any T, so bytes never favour the fallback; what grows with T is compute done
# in 16-token tl.dot tiles against thin weight tiles, which a real grouped GEMM does better. At
# T=64 V2-Lite is still memory bound (~6.6 GFLOP vs ~1.1 GB per layer); scripts/gpu_check_moe.py
# also times T=128 and 256 to place the crossover. Prefill chunks are far above it.
DEFAULT_MAX_TOKENS = 128  # measured on the H200: Triton wins up to 128 tokens (388 vs 534 us), loses at 256
MIN_DOT = 16  # tl.dot needs every dimension >= 16
ROUTE_BLOCK_P = 64  # pairs per iteration of the routing kernel


def _jit(fn):
    # Without triton the kernels stay plain functions that are never called, so this module
    # still imports (and the torch reference and the fallback still work) on CPU-only installs.
    return triton.jit(fn) if triton is not None else fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None and _interpreting():
    # The CPU interpreter needs a patch for runtime loop bounds under numpy >= 2.4; the MLA
    # kernel module (same package) owns it.
    from server.engine.triton_mla import _patch_interpreter_scalar_index

    _patch_interpreter_scalar_index()


# ----------------------------------------------------------------------------- torch reference

def moe_experts_torch(x: Tensor, topk_idx: Tensor, topk_w: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Routed experts in plain torch, any device: x [T, H], topk_idx/topk_w [T, K],
    gate_up [E, 2I, H] (gate rows first), down [E, H, I] -> [T, H] in x's dtype.

    Computes in fp32 throughout. Loops over k (K is small and static) and gathers the T selected
    experts' weights per k, so it has no data-dependent shapes (it can be graph-captured), at the
    price of materialising [T, 2I, H] per k: a reference, not a fast path.
    """
    inter = down.shape[-1]
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(topk_idx.shape[1]):
        experts = topk_idx[:, k]
        gate, up = torch.bmm(gate_up[experts].float(), xf.unsqueeze(-1)).squeeze(-1).split(inter, dim=-1)
        h = F.silu(gate) * up
        y = torch.bmm(down[experts].float(), h.unsqueeze(-1)).squeeze(-1)
        out += y * topk_w[:, k, None].float()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels

@_jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # Triton's CPU interpreter mis-computes tl.dot on bf16 operands; DOT_FP32 upcasts there.
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@_jit
def _route_ids(topk_idx_ptr, p0, num_pairs, E: tl.constexpr, BLOCK_P: tl.constexpr):
    """Expert ids of pairs p0..p0+BLOCK_P, -1 past the end and for ids outside [0, E) (an
    expert-parallel sentinel, or the padding lanes E..E_PAD would otherwise match): such pairs
    are routed nowhere."""
    pairs = p0 + tl.arange(0, BLOCK_P)
    ids = tl.load(topk_idx_ptr + pairs, mask=pairs < num_pairs, other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, -1)
    return ids, pairs


@_jit
def _route_kernel(
    topk_idx_ptr, sorted_pair_ptr, slot_expert_ptr, slot_start_ptr, slot_count_ptr,
    num_pairs, num_slots,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)

    # Pass 1: pairs per expert. A [BLOCK_P, E_PAD] one-hot per chunk keeps it to vector ops.
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        ids, _ = _route_ids(topk_idx_ptr, p0, num_pairs, E, BLOCK_P)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts  # first sorted position of each expert

    # Slot s = the s-th selected expert (ascending id). Slots past the last selected expert get
    # count 0: their addresses are disjoint from the selected ones', so no store ordering issue.
    active = counts > 0
    slots = tl.cumsum(active.to(tl.int32), axis=0) - 1
    num_active = tl.sum(active.to(tl.int32), axis=0)
    tl.store(slot_expert_ptr + slots, experts, mask=active)
    tl.store(slot_start_ptr + slots, starts, mask=active)
    tl.store(slot_count_ptr + slots, counts, mask=active)
    idle = (experts >= num_active) & (experts < num_slots)
    tl.store(slot_expert_ptr + experts, tl.zeros_like(experts), mask=idle)
    tl.store(slot_start_ptr + experts, tl.zeros_like(experts), mask=idle)
    tl.store(slot_count_ptr + experts, tl.zeros_like(experts), mask=idle)

    # Pass 2: position of every pair = its expert's start + earlier pairs of the same expert
    # (a stable counting sort).
    seen = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        ids, pairs = _route_ids(topk_idx_ptr, p0, num_pairs, E, BLOCK_P)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit + seen[None, :]
        position = tl.sum(hit * (before + starts[None, :]), axis=1)
        tl.store(sorted_pair_ptr + position, pairs, mask=ids >= 0)
        seen += tl.sum(hit, axis=0)


@_jit
def _slot_tokens(sorted_pair_ptr, start, count, m0, BLOCK_M: tl.constexpr):
    """The pair ids of rows m0..m0+BLOCK_M of a slot, their sorted positions and validity."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < count
    pairs = tl.load(sorted_pair_ptr + start + rows, mask=row_ok, other=0)
    return pairs, start + rows, row_ok


@_jit
def _gate_up_kernel(
    x_ptr, w_ptr, act_ptr, sorted_pair_ptr, slot_expert_ptr, slot_start_ptr, slot_count_ptr,
    stride_x, stride_we, stride_wr, stride_act,
    H: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    slot = tl.program_id(1)
    count = tl.load(slot_count_ptr + slot)
    start = tl.load(slot_start_ptr + slot)
    # int64: one weight tensor can exceed 2**31 elements (DeepSeek-V2: 160 x 3072 x 5120).
    expert = tl.load(slot_expert_ptr + slot).to(tl.int64)

    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of W_gate (and W_up)
    col_ok = cols < I
    offs_h = tl.arange(0, BLOCK_H)
    gate_rows = w_ptr + expert * stride_we + cols[:, None] * stride_wr  # [BLOCK_N, 1]
    up_rows = gate_rows + I * stride_wr

    # count == 0 (an idle slot) runs no iteration and writes nothing.
    for m0 in range(0, count, BLOCK_M):
        pairs, positions, row_ok = _slot_tokens(sorted_pair_ptr, start, count, m0, BLOCK_M)
        x_rows = x_ptr + (pairs // K).to(tl.int64)[:, None] * stride_x  # [BLOCK_M, 1]
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs_h
            h_ok = h < H
            w_mask = col_ok[:, None] & h_ok[None, :]
            w_gate = tl.load(gate_rows + h[None, :], mask=w_mask, other=0.0)
            w_up = tl.load(up_rows + h[None, :], mask=w_mask, other=0.0)
            xs = tl.load(x_rows + h[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            xs = xs.to(w_gate.dtype)
            acc_gate = _dot(xs, tl.trans(w_gate), acc_gate, DOT_FP32, PRECISION)
            acc_up = _dot(xs, tl.trans(w_up), acc_up, DOT_FP32, PRECISION)
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(gate) * up, fp32
        out = act_ptr + positions.to(tl.int64)[:, None] * stride_act + cols[None, :]
        tl.store(out, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@_jit
def _down_kernel(
    act_ptr, w_ptr, topk_w_ptr, ybuf_ptr, sorted_pair_ptr, slot_expert_ptr, slot_start_ptr, slot_count_ptr,
    stride_act, stride_we, stride_wr, stride_y,
    H: tl.constexpr, I: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    slot = tl.program_id(1)
    count = tl.load(slot_count_ptr + slot)
    start = tl.load(slot_start_ptr + slot)
    expert = tl.load(slot_expert_ptr + slot).to(tl.int64)

    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of down = hidden dims
    col_ok = cols < H
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + expert * stride_we + cols[:, None] * stride_wr  # [BLOCK_N, 1]

    for m0 in range(0, count, BLOCK_M):
        pairs, positions, row_ok = _slot_tokens(sorted_pair_ptr, start, count, m0, BLOCK_M)
        act_rows = act_ptr + positions.to(tl.int64)[:, None] * stride_act  # [BLOCK_M, 1]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < I
            w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(act_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a.to(w.dtype), tl.trans(w), acc, DOT_FP32, PRECISION)
        route_w = tl.load(topk_w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * route_w[:, None]
        out = ybuf_ptr + pairs.to(tl.int64)[:, None] * stride_y + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


@_jit
def _sum_k_kernel(
    ybuf_ptr, topk_idx_ptr, out_ptr, stride_y, stride_out,
    H: tl.constexpr, K: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        pair = token * K + k
        expert = tl.load(topk_idx_ptr + pair)
        # A pair with an out-of-range expert id was never computed (its ybuf row is garbage).
        valid = (expert >= 0) & (expert < E)
        acc += tl.load(ybuf_ptr + pair.to(tl.int64) * stride_y + h, mask=h_ok & valid, other=0.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


# ----------------------------------------------------------------------------- launcher

@dataclass(frozen=True)
class MoELaunchConfig:
    """Tile sizes and launch options; clipped to the problem (>= 16, <= the padded dimension).

    Defaults: the fastest of the sweep in scripts/gpu_check_moe.py on one H200 (2026-11-29, V2-Lite
    expert shapes, CUDA-graph replay): 48 / 158 / 291 us per layer at T = 1 / 8 / 64 tokens.
    """

    block_m: int = 16  # tokens per tl.dot; 16 is the minimum, decode rarely has more per expert
    gate_up_block_n: int = 32  # gate rows (and as many up rows) per program
    gate_up_block_h: int = 128  # reduction chunk over H
    gate_up_warps: int = 4
    gate_up_stages: int = 4
    down_block_n: int = 64  # hidden rows of down per program
    down_block_k: int = 64  # reduction chunk over I
    down_warps: int = 4
    down_stages: int = 4


def _tile(wanted: int, dim: int) -> int:
    return max(MIN_DOT, min(wanted, triton.next_power_of_2(dim)))


def moe_experts_triton(
    x: Tensor, topk_idx: Tensor, topk_w: Tensor, gate_up: Tensor, down: Tensor,
    config: MoELaunchConfig | None = None, out: Tensor | None = None,
) -> Tensor:
    """Same contract as `moe_experts_torch`, with the Triton kernels (CUDA, or CPU under
    TRITON_INTERPRET=1). Expert ids outside [0, E) contribute nothing. Graph-capturable."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_inputs(x, topk_idx, topk_w, gate_up, down, out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    # No-ops for the usual inputs (x from a view, topk outputs); copies are graph-safe anyway.
    x, topk_idx, topk_w = x.contiguous(), topk_idx.contiguous(), topk_w.contiguous()
    cfg = config or MoELaunchConfig()
    routing = _route(topk_idx, gate_up.shape[0])
    act = _gate_up(x, gate_up, routing, topk_idx.shape[1], cfg)
    ybuf = _down(act, down, topk_w, routing, cfg)
    _sum_k(ybuf, topk_idx, gate_up.shape[0], out)
    return out


@dataclass
class _Routing:
    sorted_pair: Tensor  # [T*K] int32: pair ids (t*K + k) grouped by expert
    slots: Tensor  # [3, S] int32: expert id, first sorted position, pair count per slot

    @property
    def num_slots(self) -> int:
        return self.slots.shape[1]


def _route(topk_idx: Tensor, num_experts: int) -> _Routing:
    num_pairs = topk_idx.numel()
    num_slots = min(num_pairs, num_experts)  # distinct experts can be no more than either
    routing = _Routing(
        sorted_pair=torch.empty(num_pairs, dtype=torch.int32, device=topk_idx.device),
        slots=torch.empty(3, num_slots, dtype=torch.int32, device=topk_idx.device),
    )
    _route_kernel[(1,)](
        topk_idx, routing.sorted_pair, routing.slots[0], routing.slots[1], routing.slots[2], num_pairs, num_slots,
        E=num_experts, E_PAD=max(MIN_DOT, triton.next_power_of_2(num_experts)), BLOCK_P=ROUTE_BLOCK_P,
    )
    return routing


def _dot_options(weight: Tensor) -> dict:
    # fp32 weights (tests): exact dots, not TF32. The interpreter gets fp32 operands (see _dot).
    return dict(DOT_FP32=_interpreting(), PRECISION="ieee" if weight.dtype == torch.float32 else "tf32")


def _gate_up(x: Tensor, gate_up: Tensor, routing: _Routing, top_k: int, cfg: MoELaunchConfig) -> Tensor:
    """act [T*K, I] in sorted order, in the weights' dtype (the down projection's input dtype)."""
    hidden, inter = x.shape[1], gate_up.shape[1] // 2
    act = torch.empty(routing.sorted_pair.numel(), inter, dtype=gate_up.dtype, device=x.device)
    block_n = _tile(cfg.gate_up_block_n, inter)
    _gate_up_kernel[(triton.cdiv(inter, block_n), routing.num_slots)](
        x, gate_up, act, routing.sorted_pair, routing.slots[0], routing.slots[1], routing.slots[2],
        x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        H=hidden, I=inter, K=top_k,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_H=_tile(cfg.gate_up_block_h, hidden),
        num_warps=cfg.gate_up_warps, num_stages=cfg.gate_up_stages, **_dot_options(gate_up),
    )
    return act


def _down(act: Tensor, down: Tensor, topk_w: Tensor, routing: _Routing, cfg: MoELaunchConfig) -> Tensor:
    """ybuf [T*K, H] fp32: each pair's weighted expert output, by original pair id."""
    hidden, inter = down.shape[1], down.shape[2]
    ybuf = torch.empty(act.shape[0], hidden, dtype=torch.float32, device=act.device)
    block_n = _tile(cfg.down_block_n, hidden)
    _down_kernel[(triton.cdiv(hidden, block_n), routing.num_slots)](
        act, down, topk_w, ybuf, routing.sorted_pair, routing.slots[0], routing.slots[1], routing.slots[2],
        act.stride(0), down.stride(0), down.stride(1), ybuf.stride(0),
        H=hidden, I=inter,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=_tile(cfg.down_block_k, inter),
        num_warps=cfg.down_warps, num_stages=cfg.down_stages, **_dot_options(down),
    )
    return ybuf


def _sum_k(ybuf: Tensor, topk_idx: Tensor, num_experts: int, out: Tensor) -> None:
    num_tokens, top_k = topk_idx.shape
    hidden = out.shape[1]
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_k_kernel[(num_tokens, triton.cdiv(hidden, block))](
        ybuf, topk_idx, out, ybuf.stride(0), out.stride(0),
        H=hidden, K=top_k, E=num_experts, BLOCK_H=block,
    )


def _check_inputs(x: Tensor, topk_idx: Tensor, topk_w: Tensor, gate_up: Tensor, down: Tensor,
                  out: Tensor | None) -> None:
    num_experts, two_inter, hidden = gate_up.shape
    if x.dim() != 2 or x.shape[1] != hidden or two_inter % 2:
        raise ValueError(f"x {tuple(x.shape)} does not match gate_up {tuple(gate_up.shape)}")
    if down.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"down {tuple(down.shape)} does not match gate_up {tuple(gate_up.shape)}")
    if topk_idx.shape != topk_w.shape or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx {tuple(topk_idx.shape)} / topk_w {tuple(topk_w.shape)} do not match x")
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1 or gate_up.dtype != down.dtype:
        raise ValueError("expert weights must share a dtype and be contiguous in their last dimension")
    if out is not None and (out.shape != x.shape or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} tensor")


# ----------------------------------------------------------------------------- module swap

def _is_supported_experts(module: nn.Module) -> bool:
    """transformers' fused 3D experts layout this file computes: [gate; up] concatenated,
    not transposed, no bias, silu."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3 and down.dim() == 3
        and getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
        and _is_silu(getattr(module, "act_fn", None))
    )


def _is_silu(act: object) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation class, not nn.SiLU: probe the values.
    if not callable(act):
        return False
    probe = torch.linspace(-4.0, 4.0, 9)
    try:
        return torch.allclose(act(probe), F.silu(probe))
    except (RuntimeError, TypeError, ValueError):  # cannot run on a CPU tensor: not ours to judge
        return False


class FusedMoEExperts(nn.Module):
    """Drop-in for a transformers `DeepseekV2Experts`: the Triton path for small token counts on
    CUDA, the wrapped module otherwise (prefill, CPU, autograd, unsupported layouts).

    The wrapped module's parameters are registered here under the same names, so the model's
    state_dict keys do not change and nothing is copied. The wrapped module itself is kept
    outside the module tree (it would duplicate the keys) and is given back by `unwrap()`.
    """

    def __init__(self, experts: nn.Module, max_tokens: int = DEFAULT_MAX_TOKENS,
                 config: MoELaunchConfig | None = None, allow_cpu: bool = False) -> None:
        super().__init__()
        self._wrapped = (experts,)  # a tuple: not registered as a submodule
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.max_tokens = max_tokens
        self.launch_config = config
        self.allow_cpu = allow_cpu  # tests: run the kernels on CPU under TRITON_INTERPRET=1
        self.supported = _is_supported_experts(experts)

    def unwrap(self) -> nn.Module:
        experts = self._wrapped[0]
        # If something replaced our Parameter objects (e.g. load_state_dict(assign=True)),
        # hand the current ones back so the wrapped module computes with the same weights.
        if experts.gate_up_proj is not self.gate_up_proj:
            experts.gate_up_proj = self.gate_up_proj
        if experts.down_proj is not self.down_proj:
            experts.down_proj = self.down_proj
        return experts

    def use_triton(self, hidden_states: Tensor) -> bool:
        on_device = hidden_states.is_cuda or (self.allow_cpu and _interpreting())
        needs_grad = torch.is_grad_enabled() and (
            hidden_states.requires_grad or self.gate_up_proj.requires_grad or self.down_proj.requires_grad
        )
        return (
            triton is not None and self.supported and on_device and not needs_grad
            and 0 < hidden_states.shape[0] <= self.max_tokens
        )

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if self.use_triton(hidden_states):
            return moe_experts_triton(
                hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                config=self.launch_config,
            )
        return self.unwrap()(hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"max_tokens={self.max_tokens}, supported={self.supported}"


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    """Modules with an `experts` child: the MoE blocks (`layer.mlp` of every MoE layer)."""
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)]


def install_fused_moe(model: nn.Module, max_tokens: int = DEFAULT_MAX_TOKENS,
                      config: MoELaunchConfig | None = None) -> int:
    """Wrap the experts of every MoE layer (of a DeepseekV2ForCausalLM or any model using
    transformers' fused 3D experts); returns how many were wrapped. Idempotent."""
    installed = 0
    for block in _moe_blocks(model):
        experts = block.experts
        if isinstance(experts, FusedMoEExperts) or not hasattr(experts, "gate_up_proj"):
            continue
        block.experts = FusedMoEExperts(experts, max_tokens=max_tokens, config=config)
        installed += 1
    return installed


def uninstall_fused_moe(model: nn.Module) -> int:
    """Put the original experts modules back; returns how many."""
    removed = 0
    for block in _moe_blocks(model):
        if isinstance(block.experts, FusedMoEExperts):
            block.experts = block.experts.unwrap()
            removed += 1
    return removed


__all__ = [
    "DEFAULT_MAX_TOKENS", "FusedMoEExperts", "MoELaunchConfig", "install_fused_moe",
    "moe_experts_torch", "moe_experts_triton", "uninstall_fused_moe",
]
