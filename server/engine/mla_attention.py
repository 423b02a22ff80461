"""MLA attention of one layer over the paged cache of stored codes (the latent, or its splice code).

Per token the layer stores `[z | k_pe]` (r + rope values), where z = splice.encode(latent) or the
latent itself at ratio 1.0. The splice's affine read path is folded into the up-projection once,
at load time, so attention never materialises the 512-wide latent:

    W_UK', W_UV' = per-head key / value up-projections of kv_b_proj(W_e . + b_e)   [H, d, r]
    decode  (one new token):  q_lat = W_UK'^T q_nope; scores over [z | k_pe]; o = W_UV' sum(p z) + b_V
    prefill (several tokens): expand the sequence's stored codes to per-head K, V and run causal SDPA

The key part of the folded bias shifts every score of a query equally and drops out of the softmax.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvsplice.patch import split_latent
from kvsplice.splice import LearnedKVSplice
from server.engine.paged_attention import paged_mla_decode


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to."""

    slot_mapping: Tensor  # [T] flat cache slot of each new token
    block_tables: Tensor  # [B, max_blocks] int32
    context_lens: Tensor  # [B] int32, cached tokens per sequence after this step's writes
    query_lens: list[int]  # new tokens per sequence (the flattened batch is their concatenation)
    query_starts: list[int]  # row of each sequence's first new token in the flattened batch
    context_lens_list: list[int]
    decode_seqs: Tensor  # [Bd] indices of sequences with one new token (absorbed path)
    decode_tokens: Tensor  # [Bd] their token rows in the flattened batch
    prefill_seqs: list[int]  # sequences with several new tokens and earlier ones cached (chunked prefill)
    max_decode_context: int
    # Sequences whose every token is new this step, padded to one batch for a single causal SDPA:
    fresh_index: Tensor | None = None  # [Bf, Lmax] token rows (padding repeats row 0)
    fresh_valid: Tensor | None = None  # [Bf, Lmax] bool, False on padding
    fresh_rows: Tensor | None = None  # [Tf] token rows in the order of fresh_valid's True entries

    def to(self, device: torch.device) -> "AttentionMetadata":
        """A copy with every tensor on `device` (for the next GPU of a layer split)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


class PagedMLAAttention(nn.Module):
    def __init__(self, attn: nn.Module, splice: LearnedKVSplice | None) -> None:
        super().__init__()
        self.attn = attn  # transformers' DeepseekV2Attention: its projections and norms are reused
        self.splice = splice
        self.num_heads = attn.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
        self.latent_dim = attn.kv_lora_rank
        self.code_dim = splice.rank if splice is not None else attn.kv_lora_rank
        self.scale = attn.scaling  # includes YaRN's mscale
        # The model's own RoPE (DeepSeek-V2 in transformers rotates interleaved pairs as complex numbers).
        self._apply_rotary = sys.modules[type(attn).__module__].apply_rotary_emb
        self._fold_up_projection()

    @torch.no_grad()
    def _fold_up_projection(self) -> None:
        weight = self.attn.kv_b_proj.weight
        bias = None
        if self.splice is not None:
            weight, bias = self.splice.fold_into_kv_b_proj(weight)
        per_head = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.code_dim)
        self.register_buffer("w_uk", per_head[:, : self.nope_dim].contiguous(), persistent=False)  # [H, nope, r]
        self.register_buffer("w_uv", per_head[:, self.nope_dim :].contiguous(), persistent=False)  # [H, v, r]
        b_v = None if bias is None else bias.view(self.num_heads, -1)[:, self.nope_dim :].contiguous()
        self.register_buffer("b_v", b_v, persistent=False)  # [H, v] or None

    def encode_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states [T, hidden] -> (stored code [T, r], k_pe before RoPE [T, rope])."""
        latent, k_pe = split_latent(self.attn.kv_a_proj_with_mqa(x), self.latent_dim)
        latent = self.attn.kv_a_layernorm(latent)
        code = self.splice.encode(latent) if self.splice is not None else latent
        return code, k_pe

    def queries(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.attn
        q = a.q_proj(x) if a.q_lora_rank is None else a.q_b_proj(a.q_a_layernorm(a.q_a_proj(x)))
        q = q.view(-1, self.num_heads, self.nope_dim + self.rope_dim)
        return q[..., : self.nope_dim], q[..., self.nope_dim :]

    def rotate(self, q_pe: Tensor, k_pe: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE through the model's own function: it wants [batch, heads, seq, dim]."""
        q_rot, k_rot = self._apply_rotary(q_pe.transpose(0, 1)[None], k_pe[None, None], freqs_cis)
        return q_rot[0].transpose(0, 1), k_rot[0, 0]

    def forward(self, x: Tensor, freqs_cis: Tensor, kv_cache: Tensor, meta: AttentionMetadata) -> Tensor:
        q_nope, q_pe = self.queries(x)
        code, k_pe = self.encode_kv(x)
        q_pe, k_pe = self.rotate(q_pe, k_pe, freqs_cis)
        kv_cache.view(-1, kv_cache.shape[-1])[meta.slot_mapping] = torch.cat([code, k_pe], dim=-1).to(kv_cache.dtype)

        out = x.new_empty(x.shape[0], self.num_heads, self.v_dim)
        if meta.decode_seqs.numel():
            rows = meta.decode_tokens
            out[rows] = self._decode(q_nope[rows], q_pe[rows], kv_cache, meta)
        if meta.fresh_index is not None:
            out[meta.fresh_rows] = self._prefill_fresh(q_nope, q_pe, code.to(kv_cache.dtype), k_pe, meta)
        for i in meta.prefill_seqs:
            rows = slice(meta.query_starts[i], meta.query_starts[i] + meta.query_lens[i])
            out[rows] = self._prefill(q_nope[rows], q_pe[rows], kv_cache, meta, i)
        return self.attn.o_proj(out.reshape(x.shape[0], -1))

    def _expand(self, z: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Stored codes [..., L, r] and RoPE keys [..., L, rope] -> per-head K [..., H, L, nope+rope], V."""
        k_nope = torch.einsum("...lr,hdr->...hld", z, self.w_uk)
        v = torch.einsum("...lr,hvr->...hlv", z, self.w_uv)
        if self.b_v is not None:
            v = v + self.b_v[:, None, :]
        k_rope = k_pe.unsqueeze(-3).expand(*k_nope.shape[:-1], -1)
        return torch.cat([k_nope, k_rope], dim=-1), v

    def _decode(self, q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, meta: AttentionMetadata) -> Tensor:
        """Absorbed attention for sequences with one new token: [Bd, H, v]."""
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, self.w_uk)
        o_lat = paged_mla_decode(
            q_lat,
            q_pe.contiguous(),
            kv_cache,
            meta.block_tables[meta.decode_seqs],
            meta.context_lens[meta.decode_seqs],
            self.scale,
            max_context_len=meta.max_decode_context,
        )
        return self._up_project_values(o_lat)

    def _up_project_values(self, o_lat: Tensor) -> Tensor:
        out = torch.einsum("bhr,hvr->bhv", o_lat, self.w_uv)
        return out if self.b_v is None else out + self.b_v

    def _prefill(self, q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, meta: AttentionMetadata, i: int) -> Tensor:
        """Causal attention of one sequence's new tokens over its whole cached context: [n, H, v]."""
        n, total = meta.query_lens[i], meta.context_lens_list[i]
        block_size = kv_cache.shape[1]
        blocks = meta.block_tables[i, : -(-total // block_size)]
        stored = kv_cache[blocks].reshape(-1, kv_cache.shape[-1])[:total]  # [L, r + rope]
        k, v = self._expand(stored[:, : self.code_dim], stored[:, self.code_dim :])  # [H, L, .]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, n, nope+rope]
        # Query j sits at position total - n + j and sees keys up to and including itself.
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=total - n)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale)
        return out.transpose(0, 1)

    def _prefill_fresh(self, q_nope: Tensor, q_pe: Tensor, code: Tensor, k_pe: Tensor, meta: AttentionMetadata) -> Tensor:
        """Sequences with nothing cached before this step attend only among their new tokens: pad
        them to one batch and run one causal SDPA (padding sits after each sequence's last token,
        so causality keeps it out of every real query). Returns [Tf, H, v] for meta.fresh_rows."""
        idx = meta.fresh_index
        k, v = self._expand(code[idx], k_pe[idx])  # [Bf, H, Lmax, .]
        q = torch.cat([q_nope, q_pe], dim=-1)[idx].transpose(1, 2)  # [Bf, H, Lmax, nope+rope]
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=self.scale)
        return out.transpose(1, 2)[meta.fresh_valid]
