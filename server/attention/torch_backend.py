"""The reference attention backend: plain torch, any device, the math every kernel is checked against.

Decode gathers each sequence's stored rows and runs the absorbed form in float32. Prefill expands
the stored codes through the folded up-projection into per-head K and V and runs scaled dot-product
attention over padded batches: one call for all fresh prefills of a step, one for all chunked ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsplice.cache_layout import CacheViews
from server.attention.backend import AttentionBackend, MLAWeights
from server.attention.metadata import AttentionMetadata, DecodeMetadata
from server.kernels.mla_decode import paged_mla_decode_torch


class TorchBackend(AttentionBackend):
    name = "torch"

    def decode(self, layer: MLAWeights, q_nope: Tensor, q_pe: Tensor, kv_cache: CacheViews,
               meta: DecodeMetadata) -> Tensor:
        q_lat = torch.bmm(q_nope.transpose(0, 1), layer.w_uk).transpose(0, 1)  # [B, H, code]
        o_lat = self.decode_latent(q_lat, q_pe, kv_cache, meta, layer.scale)
        out = torch.bmm(o_lat.transpose(0, 1), layer.w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v]
        return out if layer.b_v is None else out + layer.b_v

    def decode_latent(self, q_lat: Tensor, q_pe: Tensor, kv_cache: CacheViews, meta: DecodeMetadata,
                      scale: float) -> Tensor:
        """softmax(scores) . code per head, [B, H, code]: the part a decode kernel replaces."""
        return paged_mla_decode_torch(q_lat, q_pe, kv_cache, meta.block_tables, meta.context_lens, scale,
                                      max_context_len=meta.max_context_len)

    def prefill_fresh(self, layer: MLAWeights, q_nope: Tensor, q_pe: Tensor, stored: Tensor,
                      meta: AttentionMetadata) -> Tensor:
        # Padding sits after each sequence's last token, so causality keeps it out of every real query.
        fresh = meta.fresh
        k, v = expand(layer, stored[fresh.index])  # [B, Q, H, .]
        q = torch.cat([q_nope, q_pe], dim=-1)[fresh.index]
        out = attend(q, k, v, layer.scale, is_causal=True)
        return out.flatten(0, 1)[fresh.valid_flat]

    def prefill_chunked(self, layer: MLAWeights, q_nope: Tensor, q_pe: Tensor, kv_cache: CacheViews,
                        meta: AttentionMetadata) -> Tensor:
        chunk = meta.chunked
        blocks = -(-chunk.max_context_len // kv_cache.block_size)
        # [B, blocks * block_size, C + P] in the model dtype: a gathered copy, dequantized as it is read.
        rows = kv_cache.rows(chunk.block_tables[:, :blocks].long()).flatten(1, 2)
        k, v = expand(layer, rows)
        q = torch.cat([q_nope, q_pe], dim=-1)[chunk.index]  # [B, Q, H, .]
        # Query j of a sequence sits at position context - query_len + j and sees keys up to itself.
        positions = (chunk.context_lens - chunk.query_lens)[:, None] + torch.arange(q.shape[1], device=q.device)
        keys = torch.arange(rows.shape[1], device=q.device)
        mask = keys[None, None, :] <= positions[:, :, None]  # [B, Q, K]
        return attend(q, k, v, layer.scale, mask=mask[:, None]).flatten(0, 1)[chunk.valid_flat]


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool = False,
           mask: Tensor | None = None) -> Tensor:
    """SDPA over [B, L, H, D] tensors, returning [B, Q, H, v]. On CUDA, V is zero-padded to the
    query/key width (192 vs 128 on DeepSeek-V2): the flash kernel needs equal widths, and the
    padding's output columns are dropped."""
    v_dim = v.shape[-1]
    if q.is_cuda and v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)[..., :v_dim]


def expand(layer: MLAWeights, stored: Tensor) -> tuple[Tensor, Tensor]:
    """Stored rows [..., code + rope] -> per-head K [..., H, nope + rope] and V [..., H, v]."""
    code, k_pe = stored[..., : layer.code_dim], stored[..., layer.code_dim:]
    kv = F.linear(code.to(layer.w_kv.dtype), layer.w_kv).unflatten(-1, (layer.num_heads, -1))
    k_nope, v = kv.split([layer.nope_dim, layer.v_dim], dim=-1)
    if layer.b_v is not None:
        v = v + layer.b_v
    k_rope = k_pe.to(k_nope.dtype).unsqueeze(-2).expand(*k_nope.shape[:-1], -1)
    return torch.cat([k_nope, k_rope], dim=-1), v
