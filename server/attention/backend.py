"""The attention backend interface: MLA over the paged cache of stored codes.

The model's attention layer projects queries and writes each new token's `[code | k_pe]` row into
the cache; the backend does the rest, given the layer's folded up-projections:

    decode (absorbed): q_lat = W_UK'^T q_nope;  softmax over [code | k_pe] rows;  o = W_UV' sum(p code) + b_V
    prefill (expanded): K, V = up-projections of the stored rows; causal attention per sequence

Backends differ in the kernels they use. `TorchBackend` is the reference and runs anywhere;
`TritonBackend` decodes with the Triton split-KV kernel on CUDA. Decode is also what CUDA graphs
capture, so the interface has hooks to keep its metadata in static buffers between replays.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import Tensor

from kvsplice.cache_layout import CacheViews
from server.attention.metadata import AttentionMetadata, DecodeMetadata, StepShape, build_metadata


class MLAWeights(Protocol):
    """What a backend reads from the attention layer (folded at load time)."""

    num_heads: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    code_dim: int
    scale: float
    w_kv: Tensor  # [H * (nope + v), code]: the up-projection of a stored code, per head [k_nope | v]
    b_v: Tensor | None  # [H, v]: the value part of a folded splice bias

    @property
    def w_uk(self) -> Tensor: ...  # [H, nope, code]

    @property
    def w_uv(self) -> Tensor: ...  # [H, v, code]


class AttentionBackend(ABC):
    name: str

    def build_metadata(self, shape: StepShape, device: torch.device) -> AttentionMetadata:
        return build_metadata(shape, device)

    def forward(self, layer: MLAWeights, q_nope: Tensor, q_pe: Tensor, stored: Tensor, kv_cache: CacheViews,
                meta: AttentionMetadata) -> Tensor:
        """Attention output [T, H, v] of the step's tokens. q_nope [T, H, nope], q_pe [T, H, rope]
        (rotated); stored [T, code + rope]: the rows just written for these tokens, as the cache
        gives them back (an fp8 code dequantized)."""
        if meta.decode is not None and meta.decode.rows is None:  # a pure decode step
            return self.decode(layer, q_nope, q_pe, kv_cache, meta.decode)
        out = q_nope.new_empty(q_nope.shape[0], layer.num_heads, layer.v_dim)
        if meta.decode is not None:
            rows = meta.decode.rows
            out[rows] = self.decode(layer, q_nope[rows], q_pe[rows], kv_cache, meta.decode)
        if meta.fresh is not None:
            out[meta.fresh.rows] = self.prefill_fresh(layer, q_nope, q_pe, stored, meta)
        if meta.chunked is not None:
            out[meta.chunked.rows] = self.prefill_chunked(layer, q_nope, q_pe, kv_cache, meta)
        return out

    @abstractmethod
    def decode(self, layer: MLAWeights, q_nope: Tensor, q_pe: Tensor, kv_cache: CacheViews,
               meta: DecodeMetadata) -> Tensor:
        """[Bd, H, v] for sequences with one new token (its row is already in the cache)."""

    @abstractmethod
    def prefill_fresh(self, layer: MLAWeights, q_nope: Tensor, q_pe: Tensor, stored: Tensor,
                      meta: AttentionMetadata) -> Tensor:
        """[Tf, H, v] for meta.fresh.rows: sequences attending only among their new tokens."""

    @abstractmethod
    def prefill_chunked(self, layer: MLAWeights, q_nope: Tensor, q_pe: Tensor, kv_cache: CacheViews,
                        meta: AttentionMetadata) -> Tensor:
        """[Tc, H, v] for meta.chunked.rows: new tokens attending over their whole cached context."""

    # -- CUDA graphs: decode metadata in static buffers, refilled before every replay ------------

    def graph_metadata(self, max_batch: int, max_blocks: int, max_context_len: int, scratch_block: int,
                       block_size: int, device: torch.device) -> AttentionMetadata:
        """Static buffers for a decode-only graph; padding rows write to `scratch_block` and attend
        over nothing (context length 0)."""
        return AttentionMetadata(
            slot_mapping=torch.full((max_batch,), scratch_block * block_size, dtype=torch.long, device=device),
            decode=DecodeMetadata(
                rows=None,
                block_tables=torch.full((max_batch, max_blocks), scratch_block, dtype=torch.int32, device=device),
                context_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
                max_context_len=max_context_len,
            ),
        )

    def fill_graph_metadata(self, static: AttentionMetadata, meta: AttentionMetadata, scratch_slot: int,
                            padded_batch: int) -> None:
        """Copy a decode step's metadata into the static buffers; rows up to `padded_batch` are padding."""
        batch = meta.slot_mapping.shape[0]
        width = meta.decode.block_tables.shape[1]
        static.slot_mapping[:batch].copy_(meta.slot_mapping)
        static.slot_mapping[batch:padded_batch].fill_(scratch_slot)
        static.decode.block_tables[:batch, :width].copy_(meta.decode.block_tables)
        static.decode.context_lens[:batch].copy_(meta.decode.context_lens)
        static.decode.context_lens[batch:padded_batch].zero_()

    @staticmethod
    def sliced(static: AttentionMetadata, batch: int) -> AttentionMetadata:
        """The first `batch` rows of the static metadata (what a graph of that size captures)."""
        d = static.decode
        return AttentionMetadata(
            slot_mapping=static.slot_mapping[:batch],
            decode=DecodeMetadata(None, d.block_tables[:batch], d.context_lens[:batch], d.max_context_len),
        )


def get_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """`auto`: Triton on CUDA when it imports, the torch reference otherwise."""
    from server.attention.torch_backend import TorchBackend

    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend()
    try:
        from server.attention.triton_backend import TritonBackend
    except ImportError as exc:
        if name == "triton":
            raise ValueError(f"attention backend 'triton' needs triton: {exc}") from exc
        return TorchBackend()
    return TritonBackend()
