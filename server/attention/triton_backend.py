"""The CUDA attention backend: decode with the Triton split-KV MLA kernel (server/kernels), which
reads every cached row once for all heads; prefill as the reference backend does (SDPA)."""
from __future__ import annotations

import triton  # noqa: F401 - fail at import when Triton is missing, so get_backend falls back

from torch import Tensor

from kvsplice.cache_layout import CacheViews
from server.attention.metadata import DecodeMetadata
from server.attention.torch_backend import TorchBackend
from server.kernels.mla_decode_triton import paged_mla_decode_triton


class TritonBackend(TorchBackend):
    name = "triton"

    def decode_latent(self, q_lat: Tensor, q_pe: Tensor, kv_cache: CacheViews, meta: DecodeMetadata,
                      scale: float) -> Tensor:
        return paged_mla_decode_triton(q_lat, q_pe, kv_cache, meta.block_tables, meta.context_lens, scale,
                                       max_context_len=meta.max_context_len)
