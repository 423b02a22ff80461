"""Per-step attention metadata: where each new token goes in the paged cache and what it attends to.

A step's tokens are one flattened batch (the sequences' new tokens, concatenated). Each sequence
falls in one of three cases, and each case has its own metadata, built once per step and shared by
every layer:

- decode: one new token after cached ones; absorbed attention directly over the stored codes;
- fresh prefill: every token is new (nothing cached before); causal attention among them;
- chunked prefill: several new tokens after cached ones; they attend over the whole cache.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from server.transfer import to_device


@dataclass
class DecodeMetadata:
    rows: Tensor | None  # [Bd] token rows in the flattened batch; None: every row, in order (graphs)
    block_tables: Tensor  # [Bd, max_blocks] int32
    context_lens: Tensor  # [Bd] int32, cached tokens after this step's write (the new one included)
    max_context_len: int  # a python bound on context_lens: picks the kernel's KV split without a sync


@dataclass
class PrefillMetadata:
    """Sequences padded to one [B, Q] batch of queries, so one attention call covers all of them."""

    index: Tensor  # [B, Q] token rows in the flattened batch; padding repeats the sequence's first row
    rows: Tensor  # [Tp] the rows of the real (not padding) queries, in order
    # [Tp] where the real queries sit in the flattened [B * Q]: gathering by it, unlike masking by a
    # bool [B, Q], does not make the host wait for the device to count them (a sync every layer).
    valid_flat: Tensor
    # Chunked prefill only (the keys come from the cache):
    block_tables: Tensor | None = None  # [B, max_blocks] int32
    context_lens: Tensor | None = None  # [B] int32, cached tokens after this step's writes
    query_lens: Tensor | None = None  # [B] int32
    max_context_len: int = 0


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor  # [T] int64 flat cache slot (block * block_size + offset) of each new token
    decode: DecodeMetadata | None = None
    fresh: PrefillMetadata | None = None
    chunked: PrefillMetadata | None = None

    def to(self, device: torch.device) -> AttentionMetadata:
        """A copy with every tensor on `device` (the next GPU of a layer split)."""
        return _moved(self, device)


def _moved(obj, device: torch.device):
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = value.to(device)
        elif value is not None and hasattr(value, "__dataclass_fields__"):
            changes[f.name] = _moved(value, device)
    return replace(obj, **changes)


@dataclass
class StepShape:
    """The host-side facts of a step that the metadata is built from (numpy, no Python loops per token)."""

    query_lens: np.ndarray  # [B] new tokens per sequence
    context_lens: np.ndarray  # [B] cached tokens per sequence after this step
    block_tables: np.ndarray  # [B, max_blocks] int32 (rows padded with 0)
    slot_mapping: np.ndarray  # [T] int64

    @property
    def query_starts(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.query_lens)[:-1])).astype(np.int64)


def build_metadata(shape: StepShape, device: torch.device) -> AttentionMetadata:
    """Split the step's sequences into decode / fresh / chunked and build each case's tensors."""
    q, ctx, starts = shape.query_lens, shape.context_lens, shape.query_starts
    decode = np.flatnonzero(q == 1)
    fresh = np.flatnonzero((q > 1) & (ctx == q))
    chunked = np.flatnonzero((q > 1) & (ctx > q))
    meta = AttentionMetadata(slot_mapping=to_device(shape.slot_mapping, device, torch.long))
    if decode.size:
        every_row = decode.size == q.size  # a pure decode step: rows are 0..B-1 in order
        meta.decode = DecodeMetadata(
            rows=None if every_row else to_device(starts[decode], device, torch.long),
            block_tables=to_device(shape.block_tables[decode], device, torch.int32),
            context_lens=to_device(ctx[decode], device, torch.int32),
            max_context_len=int(ctx[decode].max()),
        )
    if fresh.size:
        meta.fresh = _padded_queries(q[fresh], starts[fresh], device)
    if chunked.size:
        meta.chunked = _padded_queries(q[chunked], starts[chunked], device)
        meta.chunked.block_tables = to_device(shape.block_tables[chunked], device, torch.int32)
        meta.chunked.context_lens = to_device(ctx[chunked], device, torch.int32)
        meta.chunked.query_lens = to_device(q[chunked], device, torch.int32)
        meta.chunked.max_context_len = int(ctx[chunked].max())
    return meta


def _padded_queries(query_lens: np.ndarray, starts: np.ndarray, device: torch.device) -> PrefillMetadata:
    longest = int(query_lens.max())
    offsets = np.arange(longest)[None, :]
    valid = offsets < query_lens[:, None]
    index = starts[:, None] + np.where(valid, offsets, 0)
    return PrefillMetadata(index=to_device(index, device, torch.long),
                           rows=to_device(index[valid], device, torch.long),
                           valid_flat=to_device(np.flatnonzero(valid), device, torch.long))
