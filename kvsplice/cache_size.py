"""How many bytes the MLA cache holds per token, with and without a splice, and what a cache holds.

Per token and layer MLA stores the latent (kv_lora_rank values, or the r-wide splice code) plus the
RoPE key (qk_rope_head_dim values, shared by all heads). The seed's formula forgot the RoPE part.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kvsplice.splice import rank_for_ratio


@dataclass(frozen=True)
class KVCacheSize:
    num_layers: int
    latent_dim: int  # kv_lora_rank
    code_dim: int  # values stored for the latent (= latent_dim at ratio 1.0)
    rope_dim: int  # qk_rope_head_dim, stored as is
    dtype_bytes: int
    batch_size: int
    seq_len: int
    compression_ratio: float

    @property
    def code_bytes_per_token(self) -> int:
        return self.num_layers * self.code_dim * self.dtype_bytes

    @property
    def rope_bytes_per_token(self) -> int:
        return self.num_layers * self.rope_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.code_bytes_per_token + self.rope_bytes_per_token

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.tokens

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            code_bytes_per_token=self.code_bytes_per_token,
            rope_bytes_per_token=self.rope_bytes_per_token,
            bytes_per_token=self.bytes_per_token,
            total_bytes=self.total_bytes,
        )
        return d


def get_kv_cache_size(
    config,
    batch_size: int = 1,
    seq_len: int = 1,
    compression_ratio: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
) -> KVCacheSize:
    """Breakdown of the cache for `batch_size` sequences of `seq_len` tokens at a compression ratio."""
    latent_dim = config.kv_lora_rank
    code_dim = latent_dim if compression_ratio == 1.0 else rank_for_ratio(latent_dim, compression_ratio)
    return KVCacheSize(
        num_layers=config.num_hidden_layers,
        latent_dim=latent_dim,
        code_dim=code_dim,
        rope_dim=config.qk_rope_head_dim,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        batch_size=batch_size,
        seq_len=seq_len,
        compression_ratio=compression_ratio,
    )


def measure_cache_bytes(cache) -> int:
    """Bytes held by the tensors of a transformers cache object (DynamicCache and friends)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def format_breakdown(size: KVCacheSize) -> str:
    """The table `kvsplice estimate` prints."""
    gib = 1024**3
    rows = [
        ("layers", f"{size.num_layers}"),
        ("latent dims (kv_lora_rank)", f"{size.latent_dim}"),
        ("stored code dims", f"{size.code_dim}  (ratio {size.compression_ratio})"),
        ("RoPE key dims (stored as is)", f"{size.rope_dim}"),
        ("bytes per value", f"{size.dtype_bytes}"),
        ("code bytes per token", f"{size.code_bytes_per_token:,}"),
        ("RoPE bytes per token", f"{size.rope_bytes_per_token:,}"),
        ("KV bytes per token", f"{size.bytes_per_token:,}"),
        ("tokens (batch x seq_len)", f"{size.tokens:,}  ({size.batch_size} x {size.seq_len})"),
        ("KV cache total", f"{size.total_bytes:,} bytes ({size.total_bytes / gib:.3f} GiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
