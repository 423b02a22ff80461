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


def format_breakdown(sizes: list[KVCacheSize]) -> str:
    """The table `kvsplice estimate` prints: one column per compression ratio."""
    gib = 1024**3
    base = sizes[0].bytes_per_token
    rows = [
        ("compression ratio", lambda s: f"{s.compression_ratio}"),
        ("stored code dims (of kv_lora_rank)", lambda s: f"{s.code_dim} of {s.latent_dim}"),
        ("RoPE key dims (stored as is)", lambda s: f"{s.rope_dim}"),
        ("code bytes per token", lambda s: f"{s.code_bytes_per_token:,}"),
        ("RoPE bytes per token", lambda s: f"{s.rope_bytes_per_token:,}"),
        ("KV bytes per token", lambda s: f"{s.bytes_per_token:,}"),
        (f"KV cache, {sizes[0].batch_size} x {sizes[0].seq_len} tokens", lambda s: f"{s.total_bytes / gib:,.3f} GiB"),
        ("tokens per GiB vs first column", lambda s: f"{base / s.bytes_per_token:.2f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    cols = [[cell(s) for s in sizes] for _, cell in rows]
    col_width = max(len(c) for row in cols for c in row)
    lines = [f"{name:<{width}}  " + "  ".join(f"{c:>{col_width}}" for c in row) for (name, _), row in zip(rows, cols)]
    head = sizes[0]
    lines.insert(0, f"{head.num_layers} layers, {head.dtype_bytes} bytes per value")
    return "\n".join(lines)
