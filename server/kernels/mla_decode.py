"""Paged, absorbed MLA decode attention: the torch reference and the dispatcher.

Decode runs one query token per sequence in the absorbed form (docs/architecture.md):
every head attends directly over the stored values of each cached token, `z` (the latent code,
`r` wide) and `k_pe` (the rotated RoPE key, `P` wide):

    scores[b, h, t] = scale * (q_lat[b, h] . z[b, t] + q_pe[b, h] . k_pe[b, t])   t < context_lens[b]
    out[b, h]       = sum_t softmax_t(scores[b, h])[t] * z[b, t]

Cache layout, per layer: `kv_cache[num_blocks, block_size, r + P]`, or its CacheViews (the code,
the RoPE key and, for an fp8 cache, a per-token scale the code is multiplied by); token t of
sequence b lives at block `block_tables[b, t // block_size]`, offset `t % block_size`.

A sequence with `context_lens[b] == 0` (a padding row, e.g. of a CUDA-graph batch) gets zeros,
not NaN, from both implementations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvsplice.cache_layout import CacheViews


def paged_mla_decode_torch(
    q_lat: Tensor,
    q_pe: Tensor,
    kv_cache: Tensor | CacheViews,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    max_context_len: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Plain-torch paged MLA decode; any device. The reference the Triton kernel is checked against.

    q_lat [B, H, r], q_pe [B, H, P], kv_cache [N, block_size, r + P] or CacheViews, block_tables
    [B, max_blocks] (int32), context_lens [B] (int32). `max_context_len`, when given, bounds the
    blocks gathered (it must be >= every context length). Returns [B, H, r] in q_lat.dtype
    (written into `out` when given).
    """
    r = q_lat.shape[-1]
    cache = CacheViews.of(kv_cache, r)
    kv = _gather_sequences(cache, block_tables, max_context_len)  # [B, T, r + P] float32
    z, k_pe = kv[..., :r], kv[..., r:]

    # float32 scores and softmax whatever the model dtype: bf16 exp/sum lose too much over long contexts.
    scores = torch.einsum("bhr,btr->bht", q_lat.float(), z)
    scores += torch.einsum("bhp,btp->bht", q_pe.float(), k_pe)
    scores *= scale

    valid = _length_mask(context_lens, kv.shape[1])[:, None, :]  # [B, 1, T]
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    # Zeroing the masked entries also turns the all-NaN rows of empty (padding) sequences into zeros.
    probs = probs.masked_fill(~valid, 0.0)

    result = torch.einsum("bht,btr->bhr", probs, z).to(q_lat.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def _gather_sequences(cache: CacheViews, block_tables: Tensor, max_context_len: int | None) -> Tensor:
    """Copy each sequence's blocks into a padded float32 [B, T, r + P] (T a multiple of block_size),
    the code dequantized."""
    num_blocks, block_size = block_tables.shape[1], cache.block_size
    if max_context_len is not None:
        num_blocks = min(num_blocks, max(1, -(-max_context_len // block_size)))
    table = block_tables[:, :num_blocks].long()
    gathered = cache.rows(table, torch.float32)  # [B, num_blocks, block_size, r + P]
    return gathered.flatten(1, 2)


def _length_mask(context_lens: Tensor, length: int) -> Tensor:
    positions = torch.arange(length, device=context_lens.device)
    return positions[None, :] < context_lens[:, None].long()


def paged_mla_decode(
    q_lat: Tensor,
    q_pe: Tensor,
    kv_cache: Tensor | CacheViews,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    max_context_len: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Paged MLA decode: the Triton kernel on CUDA when Triton imports, else the torch reference.

    Never synchronises with the host, so it can be captured in a CUDA graph. `max_context_len`
    (a python int, >= every context length) only picks how the Triton kernel splits long contexts;
    without it the block table's capacity is used. Pass the same value for every replay of a graph.
    """
    if CacheViews.of(kv_cache, q_lat.shape[-1]).code.is_cuda and _triton_available():
        from server.kernels.mla_decode_triton import paged_mla_decode_triton

        return paged_mla_decode_triton(
            q_lat, q_pe, kv_cache, block_tables, context_lens, scale,
            max_context_len=max_context_len, out=out,
        )
    return paged_mla_decode_torch(
        q_lat, q_pe, kv_cache, block_tables, context_lens, scale,
        max_context_len=max_context_len, out=out,
    )


_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    # Imported lazily: CPU-only installs have no triton, and importing it costs time on every start.
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK
