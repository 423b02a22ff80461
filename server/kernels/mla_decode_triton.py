"""Triton kernel for paged, absorbed MLA decode (same math as paged_attention.paged_mla_decode_torch).

Work mapping
- One program per (sequence, KV split). A program handles ALL heads of its sequence, so each cached
  token is read from memory once for every head: a tile of BLOCK_T tokens is loaded as
  z [BLOCK_T, r] and k_pe [BLOCK_T, P], the [H, BLOCK_T] scores come from two tl.dot calls against
  the program's queries (kept on chip for the whole loop), and an online softmax accumulates
  acc [H, r] in float32 (flash-decoding style).
- Heads are padded to at least 16 (tl.dot's minimum M); r and P are padded to powers of two and
  masked, so any r >= 1 works, though r in {128, 256, 512} and P = 64 are the tuned cases.
- Split-KV: when the batch alone would leave SMs idle (small batch, long contexts), each sequence's
  context is cut into `num_splits` equal, BLOCK_T-aligned ranges, computed on the device from its
  own length (no host sync). Each split writes a partial (max, sum, acc); a second small kernel
  merges them. With one split the main kernel normalises and writes the output directly.

fp8 cache (kvsplice.kv_quant): the code tile is loaded as fp8 and widened in registers (exact) to
fp16 for 16-bit queries (one instruction per pair of values, against two to bf16: 251 vs 307 us at
batch 128, r = 512 on the H200), with the queries and p in fp16 too (more mantissa than bf16;
absorbed queries and p * scale are far inside fp16's range for a normalised latent), or to fp32
for fp32 queries. The per-token scale multiplies the latent scores, and p before the value dot,
so no dequantized copy of the cache exists anywhere and a tile costs r + 4 + 2P bytes per token.

Nothing here reads device memory on the host, so a call can be captured in a CUDA graph: the split
count comes from the python int `max_context_len` (or the block table's capacity) and the batch.
Compile before capturing (run one call eagerly first), as Triton compiles on the first launch.
float32 inputs work too, but tl.dot then uses TF32 on the GPU (about 1e-3 relative error).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvsplice.cache_layout import CacheViews
from server.kernels.triton_utils import interpreting  # also patches the CPU interpreter when it runs

LOG2_E = 1.4426950408889634
MIN_HEADS = 16  # tl.dot needs M >= 16; smaller head counts are padded
MIN_SPLIT_TOKENS = 128  # never split a context into pieces shorter than this: partials cost bytes
# CUDA graphs pick the split count from max_model_len, so short contexts inherit it; on the H200
# (batch 1, 4224 tokens) 16 splits ran 70 us, 32 ran 67 us: beyond 16 only the merge grows.
MAX_SPLITS = 16
DEFAULT_NUM_SMS = 132  # H200; used when no CUDA device is visible (interpreter)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    # Triton's CPU interpreter mis-computes tl.dot on bf16 operands; it sets DOT_FP32 to upcast.
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _token_blocks(table_row, t0, tokens, tok_ok, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    """(cache block, offset in it) of `tokens` (a BLOCK_T-aligned tile starting at t0), int64."""
    if BLOCK_SIZE % BLOCK_T == 0:
        # The tile lies inside one cache block: one scalar table read instead of BLOCK_T.
        block = tl.load(table_row + t0 // BLOCK_SIZE).to(tl.int64)
    else:
        block = tl.load(table_row + tokens // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
    # int64 before the stride multiplies: one cache tensor can exceed 2**31 elements.
    return block, (tokens % BLOCK_SIZE).to(tl.int64)


# Not specialised on values that vary between calls (Triton would recompile when one happens to be
# 1 or a multiple of 16): the split count and the block table's width.
@triton.jit(do_not_specialize=["num_splits", "stride_bt_b"])
def _mla_decode_kernel(
    q_lat_ptr, q_pe_ptr, code_ptr, rope_ptr, scale_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
    qk_scale, num_splits,
    stride_ql_b, stride_ql_h, stride_qp_b, stride_qp_h,
    stride_bt_b, stride_o_b, stride_o_h,
    # The cache's strides are compile-time constants (fixed by its layout): Triton then knows every
    # row starts 16-byte aligned, which an fp8 row's bf16 RoPE part (656 B rows: 328 elements, not
    # a multiple of 16) would otherwise hide, and loads it in full vectors.
    stride_code_blk: tl.constexpr, stride_code_tok: tl.constexpr, stride_rope_blk: tl.constexpr,
    stride_rope_tok: tl.constexpr, stride_scale_blk: tl.constexpr, stride_scale_tok: tl.constexpr,
    H: tl.constexpr, R: tl.constexpr, P: tl.constexpr,
    H_PAD: tl.constexpr, R_PAD: tl.constexpr, P_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr, FP8: tl.constexpr, DOT_FP32: tl.constexpr, FP8_F16: tl.constexpr = False,
):
    seq = tl.program_id(0)
    split = tl.program_id(1)

    # This split's token range: the context cut into num_splits BLOCK_T-aligned pieces.
    ctx = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_T) * BLOCK_T
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    heads = tl.arange(0, H_PAD)
    cols_r = tl.arange(0, R_PAD)
    cols_p = tl.arange(0, P_PAD)
    head_ok = heads < H
    r_ok = cols_r < R
    p_ok = cols_p < P

    # Queries stay on chip for the whole loop; padded heads are zero rows (finite, never stored).
    q_lat = tl.load(
        q_lat_ptr + seq * stride_ql_b + heads[:, None] * stride_ql_h + cols_r[None, :],
        mask=head_ok[:, None] & r_ok[None, :], other=0.0,
    )
    q_pe = tl.load(
        q_pe_ptr + seq * stride_qp_b + heads[:, None] * stride_qp_h + cols_p[None, :],
        mask=head_ok[:, None] & p_ok[None, :], other=0.0,
    )

    if FP8 and FP8_F16:
        q_lat_w = q_lat.to(tl.float16)  # fp8 widens to fp16 in one instruction (to bf16 in two)
    else:
        q_lat_w = q_lat
    m_i = tl.full([H_PAD], float("-inf"), tl.float32)  # running max of the log2-scaled scores
    l_i = tl.zeros([H_PAD], tl.float32)  # running softmax denominator
    acc = tl.zeros([H_PAD, R_PAD], tl.float32)
    table_row = block_tables_ptr + seq * stride_bt_b

    for t0 in range(start, end, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        tok_ok = tokens < end
        block, offset = _token_blocks(table_row, t0, tokens, tok_ok, BLOCK_SIZE, BLOCK_T)
        code_rows = code_ptr + block * stride_code_blk + offset * stride_code_tok
        rope_rows = rope_ptr + block * stride_rope_blk + offset * stride_rope_tok
        z = tl.load(code_rows[:, None] + cols_r[None, :], mask=tok_ok[:, None] & r_ok[None, :], other=0.0)
        k_pe = tl.load(rope_rows[:, None] + cols_p[None, :], mask=tok_ok[:, None] & p_ok[None, :], other=0.0)

        if FP8:
            # The tile again, transposed by its pointers (an L1/L2 hit): two widened copies in the two
            # dot-operand layouts cost less than converting one (measured: 475 vs 566 us, batch 128).
            z_t = tl.load(code_rows[None, :] + cols_r[:, None], mask=tok_ok[None, :] & r_ok[:, None], other=0.0)
            z = z.to(q_lat_w.dtype)  # exact: every fp8 value is a bf16 (and an fp16) value
            z_t = z_t.to(q_lat_w.dtype)
            z_scale = tl.load(scale_ptr + block * stride_scale_blk + offset * stride_scale_tok, mask=tok_ok, other=0.0)
            scores_lat = _dot(q_lat_w, z_t, DOT_FP32) * z_scale[None, :]
        else:
            scores_lat = _dot(q_lat, tl.trans(z), DOT_FP32)
        scores = scores_lat + _dot(q_pe, tl.trans(k_pe), DOT_FP32)
        scores = tl.where(tok_ok[None, :], scores * qk_scale, float("-inf"))

        # Every tile holds at least one valid token, so m_new is finite and no inf - inf occurs.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # p is rounded to the code's dtype for the tensor-core dot, as flash attention does; an fp8
        # code's scale goes into p first (a [H, BLOCK_T] multiply, not [BLOCK_T, R]).
        pv = p * z_scale[None, :] if FP8 else p
        acc = acc * alpha[:, None] + _dot(pv.to(z.dtype), z, DOT_FP32)
        m_i = m_new

    if SPLIT:
        # Partials are stored padded ([B, S, H_PAD(, R_PAD)], contiguous) so no masks are needed.
        part = (seq * num_splits + split) * H_PAD
        tl.store(m_part_ptr + part + heads, m_i)
        tl.store(l_part_ptr + part + heads, l_i)
        # An empty split (short context, graph sized for long ones) skips its acc; the merge
        # sees m = -inf and does not read it.
        has_tokens = end > start
        tl.store(acc_part_ptr + (part + heads[:, None]) * R_PAD + cols_r[None, :], acc, mask=has_tokens)
    else:
        # An empty sequence (padding row) has l_i == 0 and acc == 0: write zeros, not NaN.
        denom = tl.where(l_i > 0.0, l_i, 1.0)
        result = acc / denom[:, None]
        tl.store(
            out_ptr + seq * stride_o_b + heads[:, None] * stride_o_h + cols_r[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=head_ok[:, None] & r_ok[None, :],
        )


@triton.jit(do_not_specialize=["num_splits"])
def _mla_merge_kernel(
    m_part_ptr, l_part_ptr, acc_part_ptr, out_ptr,
    num_splits, stride_o_b, stride_o_h,
    H_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
):
    """Merge the partial softmax states of one (sequence, head) over its splits."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    cols = tl.arange(0, R_PAD)

    first = seq * num_splits * H_PAD + head
    m_run = tl.load(m_part_ptr + first)
    l_run = tl.load(l_part_ptr + first)
    # Empty splits (m = -inf) never wrote their acc: mask the read, it contributes zero.
    acc = tl.load(acc_part_ptr + first * R_PAD + cols, mask=m_run > float("-inf"), other=0.0)
    for s in range(1, num_splits):
        part = first + s * H_PAD
        m_s = tl.load(m_part_ptr + part)
        acc_s = tl.load(acc_part_ptr + part * R_PAD + cols, mask=m_s > float("-inf"), other=0.0)
        m_new = tl.maximum(m_run, m_s)
        # Empty splits carry m = -inf; shift by 0 instead so -inf - -inf never makes a NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        keep = tl.exp2(m_run - m_ref)
        take = tl.exp2(m_s - m_ref)
        l_run = l_run * keep + tl.load(l_part_ptr + part) * take
        acc = acc * keep + acc_s * take
        m_run = m_new

    denom = tl.where(l_run > 0.0, l_run, 1.0)
    tl.store(
        out_ptr + seq * stride_o_b + head * stride_o_h + cols,
        (acc / denom).to(out_ptr.dtype.element_ty),
        mask=cols < R,
    )


def paged_mla_decode_triton(
    q_lat: Tensor,
    q_pe: Tensor,
    kv_cache: Tensor | CacheViews,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    max_context_len: int | None = None,
    out: Tensor | None = None,
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """Paged MLA decode with Triton. Same contract as paged_attention.paged_mla_decode_torch.

    `num_splits`, `block_t`, `num_warps`, `num_stages` override the heuristics (for tuning and
    tests). No host synchronisation: safe inside CUDA-graph capture once compiled.
    """
    batch, heads, r = q_lat.shape
    cache = CacheViews.of(kv_cache, r)
    block_size, p_dim = cache.block_size, cache.rope.shape[-1]
    _check_inputs(q_lat, q_pe, cache, block_tables, context_lens, p_dim)
    if out is None:
        out = torch.empty_like(q_lat, memory_format=torch.contiguous_format)
    elif out.shape != q_lat.shape or out.stride(-1) != 1:
        raise ValueError("out must have q_lat's shape and be contiguous in its last dimension")
    if batch == 0:
        return out

    h_pad = max(MIN_HEADS, triton.next_power_of_2(heads))
    r_pad = max(16, triton.next_power_of_2(r))
    p_pad = max(16, triton.next_power_of_2(p_dim))
    cfg_block_t, cfg_warps, cfg_stages = default_launch_config(r_pad, cache.quantized, batch)
    block_t = block_t or cfg_block_t
    if max_context_len is None:
        # The table's capacity bounds every context without reading context_lens on the host.
        max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(batch, max_context_len, _num_sms(cache.code.device))
    split = num_splits > 1

    if split:
        m_part = torch.empty(batch, num_splits, h_pad, dtype=torch.float32, device=q_lat.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(batch, num_splits, h_pad, r_pad, dtype=torch.float32, device=q_lat.device)
    else:
        m_part = l_part = acc_part = out  # unused by the kernel in this mode

    scales = cache.scale if cache.quantized else context_lens  # never read without fp8
    _mla_decode_kernel[(batch, num_splits)](
        q_lat, q_pe, cache.code, cache.rope, scales, block_tables, context_lens,
        out, m_part, l_part, acc_part,
        scale * LOG2_E, num_splits,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        stride_code_blk=cache.code.stride(0), stride_code_tok=cache.code.stride(1),
        stride_rope_blk=cache.rope.stride(0), stride_rope_tok=cache.rope.stride(1),
        stride_scale_blk=scales.stride(0), stride_scale_tok=scales.stride(-1),
        H=heads, R=r, P=p_dim, H_PAD=h_pad, R_PAD=r_pad, P_PAD=p_pad,
        BLOCK_SIZE=block_size, BLOCK_T=block_t, SPLIT=split, FP8=cache.quantized, DOT_FP32=interpreting(),
        FP8_F16=cache.quantized and q_lat.dtype in (torch.bfloat16, torch.float16),
        num_warps=num_warps or cfg_warps, num_stages=num_stages or cfg_stages,
    )
    if split:
        _mla_merge_kernel[(batch, heads)](
            m_part, l_part, acc_part, out,
            num_splits, out.stride(0), out.stride(1),
            H_PAD=h_pad, R=r, R_PAD=r_pad,
            num_warps=4 if r_pad >= 256 else 2,
        )
    return out


def default_launch_config(r_pad: int, fp8: bool = False, batch: int = 1) -> tuple[int, int, int]:
    """(BLOCK_T, num_warps, num_stages) per padded latent width, for Hopper.

    fp8 caches (timed on the H200 at 4096 tokens, scripts/gpu_fp8_kernels.py): widening the tiles
    in registers makes the kernel issue-bound, not bandwidth-bound; 64-token tiles with 8 warps
    and two stages won everywhere but r=512 at large batches, where 32 x 4 warps x 5 stages won
    (251 vs 309 us at batch 128; 34 vs 27 us at batch 1).

    Chosen from sm_90 compiles with Triton 3.6 (registers, spills, shared memory), not yet from
    timings. Because the cache rows are found through the block table (an indirect load),
    Triton's pipeliner spends stages on the table read: num_stages <= 4 leaves ONE buffer for
    the cache tile (its next load waits for the current dots), num_stages=5 gives two, so a
    program keeps a tile in flight while it computes. At r=512 that is 2 x 36 KB tiles,
    94 KB of shared memory and 128 registers with 8 warps: two programs per SM, no spills.
    """
    if fp8:
        return (32, 4, 5) if r_pad >= 512 and batch > 8 else (64, 8, 2)
    if r_pad >= 512:
        return 32, 8, 5
    if r_pad >= 256:
        return 32, 4, 5
    return 64, 4, 5


def choose_num_splits(batch: int, max_context_len: int, num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Split each context just enough that batch * splits covers the SMs once.

    Each split costs an extra fp32 [H, r] partial written and re-read, so splits never go below
    MIN_SPLIT_TOKENS tokens, and a batch that already fills the GPU is not split at all.
    """
    wanted = -(-num_sms // max(batch, 1))
    useful = max(1, max_context_len // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, useful, MAX_SPLITS))


def _check_inputs(
    q_lat: Tensor, q_pe: Tensor, cache: CacheViews, block_tables: Tensor, context_lens: Tensor, p_dim: int
) -> None:
    # The kernel assumes unit stride on the last dim of every tensor it indexes by column.
    if p_dim < 1 or q_pe.shape != (*q_lat.shape[:2], p_dim):
        raise ValueError(f"q_pe {tuple(q_pe.shape)} does not match q_lat {tuple(q_lat.shape)} and cache width")
    if cache.code_dim != q_lat.shape[-1]:
        raise ValueError(f"kv_cache code width {cache.code_dim} does not match q_lat {tuple(q_lat.shape)}")
    named = (("q_lat", q_lat), ("q_pe", q_pe), ("kv_cache", cache.code), ("kv_cache rope", cache.rope),
             ("block_tables", block_tables))
    for name, t in named:
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if not context_lens.is_contiguous():
        raise ValueError("context_lens must be contiguous")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["paged_mla_decode_triton", "choose_num_splits", "default_launch_config"]
