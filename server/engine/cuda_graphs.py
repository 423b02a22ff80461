"""CUDA graphs of the decode-only forward at a ladder of batch sizes.

Launch overhead dominates a decode step at small batch (27 layers of a few kernels each). Each graph
is captured once over static input buffers; a step copies its inputs in, replays the smallest graph
that fits and reads the hidden states out. Padding rows write their cache row to a scratch block
that no sequence owns and attend over nothing (context length 0). The attention backend owns the
static metadata (`graph_metadata` / `fill_graph_metadata`).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from kvsplice.cache_layout import CacheViews
from server.attention.backend import AttentionBackend
from server.attention.metadata import AttentionMetadata

log = logging.getLogger(__name__)
BATCH_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[CacheViews], backend: AttentionBackend, max_batch: int,
                 max_context_len: int, block_size: int, scratch_block: int, device: torch.device) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = [b for b in BATCH_LADDER if b <= max_batch] or [1]
        biggest = self.sizes[-1]
        self.scratch_slot = scratch_block * block_size
        self.input_ids = torch.zeros(biggest, dtype=torch.long, device=device)
        self.positions = torch.zeros(biggest, dtype=torch.long, device=device)
        self.meta = backend.graph_metadata(biggest, -(-max_context_len // block_size), max_context_len,
                                           scratch_block, block_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            args = (self.input_ids[:batch], self.positions[:batch], self.kv_caches,
                    self.backend.sliced(self.meta, batch))
            self.model(*args)  # warm-up: compiles kernels and settles allocations outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self.model(*args)
            self.graphs[batch] = graph
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        decode_only = meta.decode is not None and meta.decode.rows is None
        return decode_only and meta.slot_mapping.shape[0] <= self.sizes[-1]

    def run(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        batch = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.backend.fill_graph_metadata(self.meta, meta, self.scratch_slot, size)
        self.graphs[size].replay()
        return self.outputs[size][:batch]
