"""Routed (and fused shared) experts of DeepSeek-V2's MoE for any token count: Triton kernels, a
torch reference and a fast CPU path.

Math (transformers' DeepseekV2Experts), for token t and its k-th selected expert e = ids[t, k]:
    h = silu(x_t W_gate[e]^T) * (x_t W_up[e]^T)           w13[e] = [W_gate; W_up]   [2I, H]
    y_t = sum_k w[t, k] * (h W_down[e]^T)                  w2[e]                     [H, I]
Expert ids outside [0, E) contribute nothing (expert-parallel sentinels). Shared experts are
extra experts (ids E_routed..) that the router appends to every token with weight 1.

Work mapping (the vLLM / SGLang design: a grouped GEMM over expert-sorted (token, k) pairs):
  (a) alignment: the T*K pairs are sorted by expert on the device and each expert's list is
      padded to a multiple of BLOCK_M. Outputs: `sorted_ids` (pair id t*K + k, or the sentinel
      T*K on padding), `expert_ids` (the expert of every BLOCK_M block, -1 past the end) and
      `num_padded` (the padded total, on the device). Buffers have the static size
      T*K + min(E, T*K) * (BLOCK_M - 1), so shapes depend only on T. Up to SMALL_ALIGN_PAIRS
      pairs one program does it all (`_align_small_kernel`); above, three launches share the
      work: per-chunk expert histograms, one program scanning them, a per-chunk scatter.
      No atomics: the order within an expert is the pair order (deterministic).
  (b) gate/up GEMM (`_moe_gemm_kernel`, GATED): a 1D grid over (m-block, n-block) tiles with
      GROUP_SIZE_M swizzling. A program owns BLOCK_M sorted pairs of one expert and BLOCK_N
      intermediate columns: it gathers the pairs' x rows, streams BLOCK_N gate rows and the
      matching BLOCK_N up rows of the expert's w13 over H in BLOCK_K chunks (two fp32
      accumulators), and writes silu(gate) * up, rounded to the weight dtype, into
      act [max_padded, I] at the pairs' SORTED positions (so the down GEMM reads contiguous rows).
      Programs of m-blocks past the padded total return at once.
  (c) down GEMM (same kernel, not GATED): act rows x w2[e]^T over I, times the routing weight,
      written by PAIR id into ybuf [T*K, H] (x's dtype; rows of dropped pairs stay unwritten).
  (d) `_moe_sum_kernel`: out[t] = sum_k ybuf[t*K + k] over the pairs with a valid expert.
Every expert's weights are read once per BLOCK_M block of its pairs: at decode (one block per
selected expert) the GEMMs stream the selected weights at memory bandwidth; at large T the
blocks are big (BLOCK_M 64-128) and the GEMMs are compute bound.

Tiles: `MoEConfig` per token count, from a table keyed by T (the nearest key at or above T, the
largest key past the end). Built-in defaults come from public tuned tables for a similar shape
on the H200; a JSON file in server/kernels/configs/ whose "device" equals the GPU's name (as
scripts/gpu_bench_kernels.py writes it) overrides them.

No host syncs and no data-dependent shapes on the Triton path (only T, K, E and the config set
the launches): a call can be captured in a CUDA graph once its kernels are compiled (run one
eager call per token count first). bf16/fp16/fp32 weights; the GEMMs accumulate in fp32, h is
rounded to the weight dtype (as transformers computes it), and each pair's weighted down output
is rounded to x's dtype in ybuf before the fp32 sum over k (as vLLM does: at T = 16384 an fp32
ybuf would be 1 GB of extra traffic).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from server.kernels.triton_utils import (
    MIN_DOT, check_last_dim_contiguous, dot_fp32, dot_precision, jit, pad_dim, tl, triton, use_triton,
)

SMALL_ALIGN_PAIRS = 256  # up to here one alignment program; its loop is serial over chunks
ALIGN_BLOCK_P = 128  # pairs per chunk of the alignment kernels
ALIGN_BLOCK_C = 64  # chunks per step of the scan program
ALIGN_BLOCK_B = 64  # blocks per step when labelling blocks with their expert
ALIGN_BLOCK_J = 16  # padding positions per step when writing the sentinels
SUM_BLOCK_H = 1024
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_ENV = "KVSPLICE_MOE_CONFIG"  # a JSON file path that overrides the directory lookup


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class GemmTile:
    """One GEMM's tile: BLOCK_N output columns, BLOCK_K reduction chunk, GROUP_SIZE_M, launch."""

    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    """BLOCK_M (pairs per block, shared by the alignment and both GEMMs) and the two GEMM tiles.
    `up.block_n` counts gate columns: a program holds that many gate AND up columns."""

    block_m: int
    up: GemmTile
    down: GemmTile

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "MoEConfig":
        return MoEConfig(int(d["block_m"]), GemmTile(**d["up"]), GemmTile(**d["down"]))


def _from_fact_sheet(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> MoEConfig:
    # The tuned kernel computes gate and up columns in separate programs; ours holds both, so a
    # [BM, bn] tile there is a [BM, bn/2] x 2 tile here (same registers and shared memory).
    up = GemmTile(max(MIN_DOT, bn // 2), bk, group, warps, stages)
    return MoEConfig(bm, up, GemmTile(bn, bk, group, warps, stages))


# Public tuned table (E=64, N=1280, H200, bf16): T -> (BM, BN, BK, GROUP_M, warps, stages).
_FACT_SHEET = {
    1: (16, 64, 64, 1, 4, 4), 2: (16, 128, 128, 16, 4, 2), 4: (16, 64, 128, 32, 4, 5),
    8: (16, 128, 128, 32, 4, 3), 16: (16, 64, 128, 16, 4, 2), 24: (16, 128, 256, 32, 4, 2),
    32: (16, 128, 128, 1, 4, 4), 48: (16, 128, 128, 32, 8, 3), 64: (16, 128, 128, 1, 8, 3),
    96: (32, 128, 128, 1, 4, 3), 128: (32, 128, 128, 1, 4, 3), 256: (64, 64, 64, 1, 4, 3),
    512: (128, 256, 64, 1, 8, 4), 1024: (128, 256, 64, 1, 8, 4), 1536: (128, 256, 64, 1, 8, 4),
    2048: (128, 256, 64, 1, 8, 4), 3072: (128, 256, 64, 16, 8, 4), 4096: (128, 256, 64, 16, 8, 4),
}
DEFAULT_CONFIGS: dict[int, MoEConfig] = {t: _from_fact_sheet(*row) for t, row in _FACT_SHEET.items()}


def load_config_file(path: Path) -> tuple[str | None, dict[int, MoEConfig]]:
    """(device name, {T: config}) of a JSON file written by scripts/gpu_bench_kernels.py."""
    data = json.loads(Path(path).read_text())
    return data.get("device"), {int(t): MoEConfig.from_dict(c) for t, c in data["configs"].items()}


@functools.lru_cache(maxsize=None)
def _table_for_device(device_name: str | None, override: str | None) -> dict[int, MoEConfig]:
    """$KVSPLICE_MOE_CONFIG if set (any device), else the configs/*.json whose "device" is this
    GPU's name, else the built-in defaults."""
    if override:
        return load_config_file(Path(override))[1]  # asked for explicitly: errors should surface
    for path in sorted(CONFIG_DIR.glob("*.json")):
        try:
            name, table = load_config_file(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a broken file must not take the server down: the defaults still work
        if table and name == device_name:
            return table
    return DEFAULT_CONFIGS


def config_table(device: torch.device | None = None) -> dict[int, MoEConfig]:
    """The tile table for `device`: a matching configs/*.json, else DEFAULT_CONFIGS."""
    name = None
    if device is not None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)  # host-side query, no sync
    return _table_for_device(name, os.environ.get(CONFIG_ENV) or None)


def get_config(num_tokens: int, device: torch.device | None = None) -> MoEConfig:
    """The config of the smallest table key >= num_tokens (the largest key past the end)."""
    table = config_table(device)
    keys = sorted(table)
    return table[next((k for k in keys if k >= num_tokens), keys[-1])]


# ----------------------------------------------------------------------------- torch paths

def _valid_ids(topk_ids: Tensor, num_experts: int) -> Tensor:
    return (topk_ids >= 0) & (topk_ids < num_experts)


def fused_experts_torch(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """The reference (server/engine/fused_moe.py `moe_experts_torch`'s contract): x [T, H],
    topk_ids / topk_weights [T, K], w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in x's dtype.

    fp32 throughout; out-of-range ids contribute nothing. Gathers the T selected experts'
    weights per k: no data-dependent shapes (graph-capturable) but [T, 2I, H] fp32 per k of
    memory, so a reference for small T, not a fast path.
    """
    num_experts, inter = w13.shape[0], w2.shape[-1]
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(topk_ids.shape[1]):
        valid = _valid_ids(topk_ids[:, k], num_experts)
        experts = torch.where(valid, topk_ids[:, k].long(), 0)
        gate, up = torch.bmm(w13[experts].float(), xf.unsqueeze(-1)).squeeze(-1).split(inter, dim=-1)
        y = torch.bmm(w2[experts].float(), (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        out += y * torch.where(valid, topk_weights[:, k].float(), 0.0)[:, None]
    return out.to(x.dtype)


def fused_experts_looped(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor,
                         compute_dtype: torch.dtype | None = None) -> Tensor:
    """Fast path off the GPU (and the large-T reference with compute_dtype=fp32): pairs sorted
    by expert, one pair of matmuls per expert that is hit, index_add_ into an fp32 output.

    Matmuls run in `compute_dtype` (default: the weights' dtype); the intermediate h is rounded
    to it, as the kernel does. Reads the per-expert counts on the host: not graph-capturable.
    """
    num_experts, inter = w13.shape[0], w2.shape[-1]
    dtype = compute_dtype or w13.dtype
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    flat = torch.where(_valid_ids(flat, num_experts), flat, num_experts)  # bucket E: dropped
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts[:num_experts]):
        if count:
            pairs = order[start:start + count]
            tokens = pairs // top_k
            gate_up = x[tokens].to(dtype) @ w13[expert].to(dtype).T
            h = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(dtype)
            y = (h @ w2[expert].to(dtype).T).float() * weights[pairs, None]
            out.index_add_(0, tokens, y)
        start += count
    return out.to(x.dtype)


def append_shared_experts(w13: Tensor, w2: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                          num_shared: int) -> tuple[Tensor, Tensor]:
    """Routed experts [E, 2I, H] / [E, H, I] plus DeepSeek's shared-experts MLP (gate_proj and
    up_proj weights [S*I, H], down_proj [H, S*I]) as S extra experts E..E+S-1: [E+S, 2I, H],
    [E+S, H, I]. Exact: silu acts per intermediate column, so the MLP's output is the sum of its
    S column slices' outputs, which the router's weight-1 shared columns add up."""
    inter = w2.shape[-1]
    if gate.shape != (num_shared * inter, w13.shape[-1]) or up.shape != gate.shape:
        raise ValueError(f"shared gate/up {tuple(gate.shape)} do not match {num_shared} x I={inter}")
    if down.shape != (w13.shape[-1], num_shared * inter):
        raise ValueError(f"shared down {tuple(down.shape)} does not match {num_shared} x I={inter}")
    shared13 = torch.cat([gate.view(num_shared, inter, -1), up.view(num_shared, inter, -1)], dim=1)
    shared2 = down.view(down.shape[0], num_shared, inter).permute(1, 0, 2)
    return (torch.cat([w13, shared13.to(w13.dtype)]).contiguous(),
            torch.cat([w2, shared2.to(w2.dtype)]).contiguous())


# ----------------------------------------------------------------------------- alignment kernels

@jit
def _chunk_experts(ids_ptr, p0, num_pairs, E: tl.constexpr, BLOCK_P: tl.constexpr):
    """Expert ids of pairs p0..p0+BLOCK_P (-1 past the end and for ids outside [0, E)), pair ids."""
    pairs = p0 + tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
    return tl.where((ids >= 0) & (ids < E), ids, -1), pairs


@jit
def _chunk_counts(ids, E_PAD: tl.constexpr):
    """Pairs per expert in one chunk: a [BLOCK_P, E_PAD] one-hot keeps it to vector ops."""
    experts = tl.arange(0, E_PAD)
    return tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)


@jit
def _chunk_scatter(ids, pairs, base, sorted_ptr, E_PAD: tl.constexpr):
    """Store the chunk's pair ids at base[expert] + (earlier pairs of that expert in the chunk);
    returns base advanced past them (a stable counting sort)."""
    experts = tl.arange(0, E_PAD)
    hit = (ids[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.cumsum(hit, axis=0) - hit
    position = tl.sum(hit * (rank + base[None, :]), axis=1)
    tl.store(sorted_ptr + position, pairs, mask=ids >= 0)
    return base + tl.sum(hit, axis=0)


@jit
def _finish_alignment(counts, sorted_ptr, expert_ids_ptr, num_padded_ptr, sentinel, max_blocks,
                      BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_J: tl.constexpr):
    """From the per-expert counts: padded starts (returned), the padded total, the expert of
    every block (-1 past the total) and the sentinel in every expert's padding tail."""
    experts = tl.arange(0, E_PAD)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)

    # Block b starts at b * BLOCK_M; its expert is the number of experts that end at or before
    # that (experts with no pairs end where the previous one does, so they are skipped).
    for b0 in range(0, max_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        before = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        owner = tl.where(blocks * BLOCK_M < total, before, -1)
        tl.store(expert_ids_ptr + blocks, owner, mask=blocks < max_blocks)

    # The padding tail of expert e: positions starts + counts + j, j < padded - counts (< BLOCK_M).
    tail = padded - counts
    for j0 in tl.static_range(0, BLOCK_M, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        pos = (starts + counts)[:, None] + j[None, :]
        fill = tl.zeros([E_PAD, BLOCK_J], tl.int32) + sentinel
        tl.store(sorted_ptr + pos, fill, mask=j[None, :] < tail[:, None])
    return starts


@jit(do_not_specialize=["num_pairs", "max_blocks"])
def _align_small_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, max_blocks,
                        E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    counts = tl.zeros([E_PAD], tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        ids, _ = _chunk_experts(ids_ptr, p0, num_pairs, E, BLOCK_P)
        counts += _chunk_counts(ids, E_PAD)
    base = _finish_alignment(counts, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, max_blocks,
                             BLOCK_M, E_PAD, BLOCK_B, BLOCK_J)
    for p0 in range(0, num_pairs, BLOCK_P):
        ids, pairs = _chunk_experts(ids_ptr, p0, num_pairs, E, BLOCK_P)
        base = _chunk_scatter(ids, pairs, base, sorted_ptr, E_PAD)


@jit(do_not_specialize=["num_pairs"])
def _align_count_kernel(ids_ptr, chunk_ptr, num_pairs, E: tl.constexpr, E_PAD: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    chunk = tl.program_id(0)
    ids, _ = _chunk_experts(ids_ptr, chunk * BLOCK_P, num_pairs, E, BLOCK_P)
    tl.store(chunk_ptr + chunk * E_PAD + tl.arange(0, E_PAD), _chunk_counts(ids, E_PAD))


@jit(do_not_specialize=["num_pairs", "num_chunks", "max_blocks"])
def _align_scan_kernel(chunk_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, num_chunks, max_blocks,
                       E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """Replaces each chunk's counts by its offset within each expert (an exclusive scan over
    chunks), then writes the experts' padded starts into row `num_chunks` of the scratch."""
    experts = tl.arange(0, E_PAD)
    carry = tl.zeros([E_PAD], tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        ptrs = chunk_ptr + chunks[:, None] * E_PAD + experts[None, :]
        ok = (chunks < num_chunks)[:, None]
        tile = tl.load(ptrs, mask=ok, other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=ok)
        carry += tl.sum(tile, axis=0)
    starts = _finish_alignment(carry, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, max_blocks,
                               BLOCK_M, E_PAD, BLOCK_B, BLOCK_J)
    tl.store(chunk_ptr + num_chunks * E_PAD + experts, starts)


@jit(do_not_specialize=["num_pairs", "num_chunks"])
def _align_scatter_kernel(ids_ptr, chunk_ptr, sorted_ptr, num_pairs, num_chunks, E: tl.constexpr,
                          E_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    base = tl.load(chunk_ptr + num_chunks * E_PAD + experts) + tl.load(chunk_ptr + chunk * E_PAD + experts)
    ids, pairs = _chunk_experts(ids_ptr, chunk * BLOCK_P, num_pairs, E, BLOCK_P)
    _chunk_scatter(ids, pairs, base, sorted_ptr, E_PAD)


@dataclass
class Alignment:
    """Expert-sorted, BLOCK_M-padded pair order (module docstring, step a)."""

    sorted_ids: Tensor  # [max_blocks * block_m] int32: pair ids, sentinel num_pairs on padding
    expert_ids: Tensor  # [max_blocks] int32: the expert of each block, -1 past num_padded
    num_padded: Tensor  # [1] int32: padded total (multiple of block_m)
    num_pairs: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.expert_ids.shape[0]


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static bound on the padded total: every hit expert (at most min(E, pairs)) adds < BLOCK_M."""
    return num_pairs + min(num_experts, num_pairs) * (block_m - 1)


def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    """Step (a) on the device; topk_ids [T, K] int32/int64, contiguous."""
    if block_m < MIN_DOT or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= {MIN_DOT}, got {block_m}")
    num_pairs = topk_ids.numel()
    max_blocks = triton.cdiv(max_padded_pairs(num_pairs, num_experts, block_m), block_m)
    device = topk_ids.device
    align = Alignment(
        sorted_ids=torch.empty(max_blocks * block_m, dtype=torch.int32, device=device),
        expert_ids=torch.empty(max_blocks, dtype=torch.int32, device=device),
        num_padded=torch.empty(1, dtype=torch.int32, device=device),
        num_pairs=num_pairs, block_m=block_m,
    )
    e_pad = pad_dim(num_experts, MIN_DOT)
    common = dict(BLOCK_M=block_m, BLOCK_B=ALIGN_BLOCK_B, BLOCK_J=min(ALIGN_BLOCK_J, block_m))
    if num_pairs <= SMALL_ALIGN_PAIRS:
        _align_small_kernel[(1,)](
            topk_ids, align.sorted_ids, align.expert_ids, align.num_padded, num_pairs, max_blocks,
            E=num_experts, E_PAD=e_pad, BLOCK_P=ALIGN_BLOCK_P, num_warps=4, **common,
        )
        return align
    num_chunks = triton.cdiv(num_pairs, ALIGN_BLOCK_P)
    scratch = torch.empty((num_chunks + 1) * e_pad, dtype=torch.int32, device=device)
    _align_count_kernel[(num_chunks,)](topk_ids, scratch, num_pairs, E=num_experts, E_PAD=e_pad,
                                       BLOCK_P=ALIGN_BLOCK_P, num_warps=4)
    _align_scan_kernel[(1,)](scratch, align.sorted_ids, align.expert_ids, align.num_padded, num_pairs, num_chunks,
                             max_blocks, E_PAD=e_pad, BLOCK_C=ALIGN_BLOCK_C, num_warps=8, **common)
    _align_scatter_kernel[(num_chunks,)](topk_ids, scratch, align.sorted_ids, num_pairs, num_chunks,
                                         E=num_experts, E_PAD=e_pad, BLOCK_P=ALIGN_BLOCK_P, num_warps=4)
    return align


# ----------------------------------------------------------------------------- grouped GEMM

@jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # Triton's CPU interpreter mis-computes tl.dot on bf16 operands; DOT_FP32 upcasts there.
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@jit
def _tile_coords(max_blocks, N_OUT: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(m-block, n-block) of this program: GROUP_M m-blocks walk the n-blocks together, so their
    weight tiles are reused from L2 (large T); GROUP_M = 1 is plain row-major."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(max_blocks - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@jit(do_not_specialize=["num_pairs", "max_blocks"])
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, topk_w_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr,
    num_pairs, max_blocks, stride_a, stride_we, stride_wn, stride_c,
    N_OUT: tl.constexpr, D_IN: tl.constexpr, TOP_K: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """GATED: c[sorted pos] = silu(a_tok W_gate^T) * (a_tok W_up^T), a = x gathered by token.
    Else:     c[pair] = w[pair] * (a[sorted pos] W^T), a = act in sorted order."""
    pid_m, pid_n = _tile_coords(max_blocks, N_OUT, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the padded total: the static grid covers the worst case only
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)  # int64: E * 2I * H can exceed 2**31

    positions = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + positions)
    row_ok = pairs < num_pairs
    if GATED:
        # Padding rows read token 0 (valid memory, results never used) instead of a masked load.
        a_rows = tl.where(row_ok, pairs // TOP_K, 0).to(tl.int64)
    else:
        a_rows = positions.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + offs_k[None, :]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N_OUT wrap onto valid rows: unmasked loads, the results are never stored.
    w_cols = cols % N_OUT
    b_ptrs = w_ptr + expert * stride_we + w_cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        if D_IN % BLOCK_K == 0:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < D_IN - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        a = a.to(b.dtype)
        acc = _dot(a, b, acc, DOT_FP32, PRECISION)
        if GATED:
            up_ptrs = b_ptrs + N_OUT * stride_wn
            if D_IN % BLOCK_K == 0:
                b_up = tl.load(up_ptrs)
            else:
                b_up = tl.load(up_ptrs, mask=(offs_k < D_IN - k0)[:, None], other=0.0)
            acc_up = _dot(a, b_up, acc_up, DOT_FP32, PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    col_ok = cols < N_OUT
    if GATED:
        act = acc * tl.sigmoid(acc) * acc_up
        # Every row of the block is written (padding rows too) so the down GEMM reads no garbage.
        c_ptrs = c_ptr + positions.to(tl.int64)[:, None] * stride_c + cols[None, :]
        tl.store(c_ptrs, act.to(c_ptr.dtype.element_ty), mask=col_ok[None, :])
    else:
        route_w = tl.load(topk_w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_c + cols[None, :]
        tl.store(c_ptrs, (acc * route_w[:, None]).to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@jit(do_not_specialize=["num_pairs"])
def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, num_pairs, stride_y, stride_out,
                    H: tl.constexpr, TOP_K: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in tl.static_range(TOP_K):
        pair = token * TOP_K + k
        expert = tl.load(ids_ptr + pair)
        # A pair with an out-of-range expert was never computed: its ybuf row is garbage.
        valid = (expert >= 0) & (expert < E)
        acc += tl.load(y_ptr + pair * stride_y + h, mask=h_ok & valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def _clip(wanted: int, dim: int) -> int:
    """A tile no wider than the padded dimension and no narrower than tl.dot allows."""
    return max(MIN_DOT, min(wanted, pad_dim(dim)))


def _launch_gemm(a: Tensor, w: Tensor, c: Tensor, topk_w: Tensor, align: Alignment, tile: GemmTile,
                 n_out: int, top_k: int, gated: bool) -> None:
    d_in = w.shape[2]
    block_n, block_k = _clip(tile.block_n, n_out), _clip(tile.block_k, d_in)
    grid = (align.max_blocks * triton.cdiv(n_out, block_n),)
    _moe_gemm_kernel[grid](
        a, w, c, topk_w, align.sorted_ids, align.expert_ids, align.num_padded,
        align.num_pairs, align.max_blocks, a.stride(0), w.stride(0), w.stride(1), c.stride(0),
        N_OUT=n_out, D_IN=d_in, TOP_K=top_k, GATED=gated,
        BLOCK_M=align.block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=tile.group_m,
        DOT_FP32=dot_fp32(), PRECISION=dot_precision(w.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )


def moe_gemm_up(x: Tensor, w13: Tensor, top_k: int, align: Alignment, tile: GemmTile,
                act: Tensor | None = None) -> Tensor:
    """Step (b): act [max_blocks * BLOCK_M, I] (weight dtype) in sorted order."""
    inter = w13.shape[1] // 2
    if act is None:
        act = torch.empty(align.sorted_ids.shape[0], inter, dtype=w13.dtype, device=x.device)
    _launch_gemm(x, w13, act, x, align, tile, inter, top_k, gated=True)  # topk_w unused: x as a stand-in
    return act


def moe_gemm_down(act: Tensor, w2: Tensor, topk_weights: Tensor, align: Alignment, tile: GemmTile,
                  out_dtype: torch.dtype, ybuf: Tensor | None = None) -> Tensor:
    """Step (c): ybuf [T*K, H] (out_dtype), each pair's weighted expert output by pair id."""
    if ybuf is None:
        ybuf = torch.empty(align.num_pairs, w2.shape[1], dtype=out_dtype, device=act.device)
    _launch_gemm(act, w2, ybuf, topk_weights, align, tile, w2.shape[1], 1, gated=False)
    return ybuf


def moe_sum(ybuf: Tensor, topk_ids: Tensor, num_experts: int, out: Tensor) -> Tensor:
    """Step (d): out [T, H] = sum over k of the valid pairs' ybuf rows."""
    tokens, top_k = topk_ids.shape
    hidden = out.shape[1]
    block = min(SUM_BLOCK_H, pad_dim(hidden, 16))
    _moe_sum_kernel[(tokens, triton.cdiv(hidden, block))](
        ybuf, topk_ids, out, topk_ids.numel(), ybuf.stride(0), out.stride(0),
        H=hidden, TOP_K=top_k, E=num_experts, BLOCK_H=block,
    )
    return out


# ----------------------------------------------------------------------------- public API

def fused_experts_triton(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor,
                         config: MoEConfig | None = None, out: Tensor | None = None) -> Tensor:
    """Steps (a)-(d) (module docstring); same contract as `fused_experts_torch`."""
    _check_inputs(x, topk_ids, topk_weights, w13, w2, out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    # No-ops for the usual inputs (router outputs); copies are graph-safe anyway.
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    cfg = config or get_config(x.shape[0], x.device)
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    align = moe_align(topk_ids, num_experts, cfg.block_m)
    act = moe_gemm_up(x, w13, top_k, align, cfg.up)
    ybuf = moe_gemm_down(act, w2, topk_weights, align, cfg.down, x.dtype)
    return moe_sum(ybuf, topk_ids, num_experts, out)


def fused_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor,
                  config: MoEConfig | None = None, out: Tensor | None = None, impl: str | None = None) -> Tensor:
    """Routed experts: x [T, H] (rows may be strided), topk_ids [T, K] int32/int64, topk_weights
    [T, K] fp32, w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I] -> [T, H] in x's dtype.

    CUDA (or impl="triton"): the Triton kernels with `config` (default: the table's entry for
    T). Otherwise `fused_experts_looped`, the fast CPU path (host syncs: not for graphs).
    """
    if use_triton(x, impl):
        return fused_experts_triton(x, topk_ids, topk_weights, w13, w2, config=config, out=out)
    result = fused_experts_looped(x, topk_ids, topk_weights, w13, w2)
    return result if out is None else out.copy_(result)


def _check_inputs(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor,
                  out: Tensor | None) -> None:
    num_experts, two_inter, hidden = w13.shape
    if x.dim() != 2 or x.shape[1] != hidden or two_inter % 2:
        raise ValueError(f"x {tuple(x.shape)} does not match w13 {tuple(w13.shape)}")
    if w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} does not match w13 {tuple(w13.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} do not match x")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("topk_ids must be int32 or int64")
    if w13.dtype != w2.dtype:
        raise ValueError("w13 and w2 must share a dtype")
    check_last_dim_contiguous(x=x, w13=w13, w2=w2)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be a {tuple(x.shape)} {x.dtype} tensor, contiguous in its last dim")


__all__ = [
    "Alignment", "DEFAULT_CONFIGS", "append_shared_experts", "GemmTile", "MoEConfig", "config_table", "fused_experts",
    "fused_experts_looped", "fused_experts_torch", "fused_experts_triton", "get_config", "load_config_file",
    "max_padded_pairs", "moe_align", "moe_gemm_down", "moe_gemm_up", "moe_sum",
]
