"""What one cached token looks like: the single description every part of the system reads.

Per token and layer MLA stores the latent (kv_lora_rank values, or the r-wide splice code) plus the
RoPE key (qk_rope_head_dim values, shared by all heads), side by side in one row of `width` values:

    [ code (code_dim) | k_pe (rope_dim) ]

The layout is derived once, from the splices that are really loaded (or from a ratio when only an
estimate is wanted), and then read by the cache allocation, the KV budget, the attention kernels,
the metrics and the start-up log, so the ratio becomes a width in exactly one place.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsplice.splice import LearnedKVSplice, rank_for_ratio


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    latent_dim: int  # the model's kv_lora_rank
    code_dim: int  # values stored for the latent: latent_dim without a splice, the splice rank with one
    rope_dim: int  # qk_rope_head_dim, stored as is
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16  # tokens per block of the paged cache

    @classmethod
    def for_ratio(cls, config, compression_ratio: float = 1.0, dtype: torch.dtype = torch.bfloat16,
                  block_size: int = 16) -> CacheLayout:
        """The layout a splice at `compression_ratio` would give (1.0: plain MLA, no splice)."""
        latent = config.kv_lora_rank
        code = latent if compression_ratio == 1.0 else rank_for_ratio(latent, compression_ratio)
        return cls(config.num_hidden_layers, latent, code, config.qk_rope_head_dim, dtype, block_size)

    @classmethod
    def for_splices(cls, config, splices: Sequence[LearnedKVSplice | None], dtype: torch.dtype,
                    block_size: int = 16) -> CacheLayout:
        """The layout of the splices actually loaded (one per layer, None for none)."""
        widths = {config.kv_lora_rank if s is None else s.rank for s in splices}
        if len(widths) != 1 or len(splices) != config.num_hidden_layers:
            raise ValueError(f"splices must be one per layer ({config.num_hidden_layers}) with one code width, "
                             f"got {len(splices)} with widths {sorted(widths)}")
        return cls(config.num_hidden_layers, config.kv_lora_rank, widths.pop(), config.qk_rope_head_dim, dtype,
                   block_size)

    @property
    def spliced(self) -> bool:
        return self.code_dim != self.latent_dim

    @property
    def compression_ratio(self) -> float:
        """Fraction of the latent stored, as the splices hold it (not as configured)."""
        return self.code_dim / self.latent_dim

    @property
    def width(self) -> int:
        """Values per token and layer."""
        return self.code_dim + self.rope_dim

    @property
    def bytes_per_value(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.width * self.bytes_per_value

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_per_layer * self.num_layers

    @property
    def code_bytes_per_token(self) -> int:
        return self.code_dim * self.bytes_per_value * self.num_layers

    @property
    def rope_bytes_per_token(self) -> int:
        return self.rope_dim * self.bytes_per_value * self.num_layers

    def block_bytes(self, num_layers: int | None = None) -> int:
        """Bytes of one block over `num_layers` layers (all of them by default)."""
        layers = self.num_layers if num_layers is None else num_layers
        return self.bytes_per_token_per_layer * self.block_size * layers

    def describe(self) -> str:
        """One line for logs: what a token costs and why."""
        return (f"{self.code_dim} code + {self.rope_dim} RoPE values x {self.bytes_per_value} B x "
                f"{self.num_layers} layers = {self.bytes_per_token:,} B per token "
                f"(compression ratio {self.compression_ratio:g}, blocks of {self.block_size} tokens)")
