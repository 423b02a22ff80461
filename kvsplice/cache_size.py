"""How many bytes the MLA cache holds per token, with and without a splice, and what a cache holds.

Per token and layer MLA stores the latent (kv_lora_rank values, or the r-wide splice code) plus the
RoPE key (qk_rope_head_dim values, shared by all heads). Both count: a formula without the RoPE part understates the cache by 64 / 576 at ratio 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsplice.cache_layout import CacheLayout


@dataclass(frozen=True)
class KVCacheSize:
    """A cache layout applied to a workload of `batch_size` sequences of `seq_len` tokens."""

    layout: CacheLayout
    batch_size: int
    seq_len: int
    compression_ratio: float  # as asked for (the layout's code_dim is what it gives)

    @property
    def kv_cache_dtype(self) -> str:
        return self.layout.kv_cache_dtype

    def __getattr__(self, name: str):
        # num_layers, code_dim, bytes_per_token, ...: the layout answers for one token.
        if name == "layout":
            raise AttributeError(name)
        return getattr(self.layout, name)

    @property
    def dtype_bytes(self) -> int:
        return self.layout.bytes_per_value

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_bytes(self) -> int:
        return self.layout.bytes_per_token * self.tokens

    def as_dict(self) -> dict:
        lay = self.layout
        return dict(
            num_layers=lay.num_layers, latent_dim=lay.latent_dim, code_dim=lay.code_dim, rope_dim=lay.rope_dim,
            dtype_bytes=lay.bytes_per_value, batch_size=self.batch_size, seq_len=self.seq_len,
            compression_ratio=self.compression_ratio, kv_cache_dtype=lay.kv_cache_dtype, code_bytes_per_token=lay.code_bytes_per_token,
            rope_bytes_per_token=lay.rope_bytes_per_token, bytes_per_token=lay.bytes_per_token,
            total_bytes=self.total_bytes,
        )


def get_kv_cache_size(
    config,  # a model config, a model (its .config), or a name: shipped (deepseek-v2-lite), hub id or path
    batch_size: int = 1,
    seq_len: int = 1,
    compression_ratio: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtype: str = "auto",
) -> KVCacheSize:
    """Breakdown of the cache for `batch_size` sequences of `seq_len` tokens at a compression ratio,
    stored in the model `dtype` or, with kv_cache_dtype fp8*, as an fp8 code with per-token scales."""
    if isinstance(config, str):
        from kvsplice.model_source import load_config

        config = load_config(config)
    config = getattr(config, "config", config)  # a transformers model
    if getattr(config, "kv_lora_rank", None) is None:
        raise ValueError(f"{type(config).__name__} has no kv_lora_rank: not an MLA (DeepSeek-V2) config")
    layout = CacheLayout.for_ratio(config, compression_ratio, dtype, kv_cache_dtype=kv_cache_dtype)
    return KVCacheSize(layout, batch_size, seq_len, compression_ratio)


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
        ("cache dtype (code)", lambda s: s.kv_cache_dtype if s.layout.quantized else str(s.layout.dtype)[6:]),
        ("stored code dims (of kv_lora_rank)", lambda s: f"{s.code_dim} of {s.latent_dim}"),
        ("RoPE key dims (stored as is)", lambda s: f"{s.rope_dim}"),
        ("code (+ fp8 scale) bytes per token", lambda s: f"{s.code_bytes_per_token:,}"),
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
    lines.insert(0, f"{head.num_layers} layers, {head.dtype_bytes} bytes per model-dtype value")
    return "\n".join(lines)
