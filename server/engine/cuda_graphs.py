"""CUDA graphs of the decode-only forward at a ladder of batch sizes.

A decode step of DeepSeek-V2 launches thousands of small kernels (27 layers of attention, norms,
router, experts); eagerly, launch overhead dominates at small batch. Each graph is captured once
over static input buffers; a step copies its inputs in, replays the smallest graph that fits and
reads the hidden states out. Padding rows write their cache entry to a scratch block that no
sequence owns and attend over nothing (context length 0).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from server.engine.mla_attention import AttentionMetadata

log = logging.getLogger(__name__)
BATCH_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

Forward = Callable[[Tensor, Tensor, AttentionMetadata], Tensor]


class DecodeGraphs:
    def __init__(self, forward: Forward, max_batch: int, max_context_len: int, block_size: int,
                 scratch_block: int, device: torch.device) -> None:
        self.sizes = [b for b in BATCH_LADDER if b <= max_batch] or [1]
        self.max_context_len = max_context_len
        self.scratch_slot = scratch_block * block_size
        biggest, max_blocks = self.sizes[-1], -(-max_context_len // block_size)
        self.input_ids = torch.zeros(biggest, dtype=torch.long, device=device)
        self.positions = torch.zeros(biggest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((biggest,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((biggest, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(biggest, dtype=torch.int32, device=device)
        self.rows = torch.arange(biggest, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        self._capture(forward)

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            context_lens=self.context_lens[:batch],
            query_lens=[1] * batch,
            query_starts=list(range(batch)),
            context_lens_list=[],
            decode_seqs=self.rows[:batch],
            decode_tokens=self.rows[:batch],
            prefill_seqs=[],
            max_decode_context=self.max_context_len,
        )

    @torch.inference_mode()
    def _capture(self, forward: Forward) -> None:
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            args = (self.input_ids[:batch], self.positions[:batch], self._meta(batch))
            forward(*args)  # warm-up: compiles kernels and settles allocations outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = forward(*args)
            self.graphs[batch] = graph
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        decode_only = len(meta.decode_seqs) == len(meta.query_lens)
        return decode_only and len(meta.query_lens) <= self.sizes[-1]

    def run(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        batch = len(meta.query_lens)
        size = next(s for s in self.sizes if s >= batch)
        width = meta.block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:size].fill_(self.scratch_slot)
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        self.context_lens[:batch].copy_(meta.context_lens)
        self.context_lens[batch:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:batch]
