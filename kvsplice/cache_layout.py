"""What one cached token looks like: the single description every part of the system reads.

Per token and layer MLA stores the latent (kv_lora_rank values, or the r-wide splice code) plus the
RoPE key (qk_rope_head_dim values, shared by all heads), side by side in one row:

    model dtype (kv_cache_dtype auto/bf16):  [ code (code_dim) | k_pe (rope_dim) ]          values
    fp8 (kv_cache_dtype fp8*):               [ code fp8 | scale fp32 + pad | k_pe bf16 ]    bytes

The fp8 row is FlashMLA's idea (656 B on V2-Lite at ratio 1.0, as there): the code as fp8 with one
float32 scale per token (kvsplice.kv_quant says why), the RoPE key kept in the model dtype, every
part starting on a 16-byte boundary so the kernels load it in full vectors. The cache tensor is
then raw bytes, and `views` cuts it into the typed parts once, at allocation.

The layout is derived once, from the splices that are really loaded (or from a ratio when only an
estimate is wanted), and then read by the cache allocation, the KV budget, the attention kernels,
the metrics and the start-up log, so the ratio and the dtype become a row size in exactly one place.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvsplice.kv_quant import SCALE_BYTES, dequantize, fp8_dtype
from kvsplice.splice import LearnedKVSplice, rank_for_ratio

ALIGN = 16  # bytes: each part of an fp8 row starts on a full-vector boundary


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class CacheViews:
    """One layer's cache `tensor` [N, block_size, row_size] cut into its typed parts: code
    [N, block_size, C] (fp8 or the model dtype), rope [N, block_size, P] (model dtype), scale
    [N, block_size] float32 or None (not fp8)."""

    tensor: Tensor
    code: Tensor
    rope: Tensor
    scale: Tensor | None = None

    @classmethod
    def of(cls, kv_cache: Tensor | CacheViews, code_dim: int) -> CacheViews:
        """CacheViews as they are; a model-dtype cache tensor [N, block_size, code_dim + P] cut in two
        (kernels and tests take either)."""
        if isinstance(kv_cache, CacheViews):
            return kv_cache
        return cls(kv_cache, kv_cache[..., :code_dim], kv_cache[..., code_dim:])

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def num_blocks(self) -> int:
        return self.code.shape[0]

    @property
    def block_size(self) -> int:
        return self.code.shape[1]

    @property
    def code_dim(self) -> int:
        return self.code.shape[2]

    def rows(self, blocks: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """[..., block_size, C + P] rows of the cache blocks `blocks` (any index shape), the code
        dequantized: the values attention uses, in `dtype` (default the RoPE part's)."""
        dtype = dtype or self.rope.dtype
        code = self.code[blocks]
        code = dequantize(code, self.scale[blocks]) if self.quantized else code
        return torch.cat([code.to(dtype), self.rope[blocks].to(dtype)], dim=-1)


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    latent_dim: int  # the model's kv_lora_rank
    code_dim: int  # values stored for the latent: latent_dim without a splice, the splice rank with one
    rope_dim: int  # qk_rope_head_dim, stored as is
    dtype: torch.dtype = torch.bfloat16  # the model dtype: the RoPE part, and the code unless fp8
    block_size: int = 16  # tokens per block of the paged cache
    kv_cache_dtype: str = "auto"  # vLLM's name: auto/bf16 (the model dtype), fp8/fp8_e4m3/fp8_e5m2

    def __post_init__(self) -> None:
        fp8_dtype(self.kv_cache_dtype)  # refuses unknown names

    @classmethod
    def for_ratio(cls, config, compression_ratio: float = 1.0, dtype: torch.dtype = torch.bfloat16,
                  block_size: int = 16, kv_cache_dtype: str = "auto") -> CacheLayout:
        """The layout a splice at `compression_ratio` would give (1.0: plain MLA, no splice)."""
        latent = config.kv_lora_rank
        code = latent if compression_ratio == 1.0 else rank_for_ratio(latent, compression_ratio)
        return cls(config.num_hidden_layers, latent, code, config.qk_rope_head_dim, dtype, block_size, kv_cache_dtype)

    @classmethod
    def for_splices(cls, config, splices: Sequence[LearnedKVSplice | None], dtype: torch.dtype,
                    block_size: int = 16, kv_cache_dtype: str = "auto") -> CacheLayout:
        """The layout of the splices actually loaded (one per layer, None for none)."""
        widths = {config.kv_lora_rank if s is None else s.rank for s in splices}
        if len(widths) != 1 or len(splices) != config.num_hidden_layers:
            raise ValueError(f"splices must be one per layer ({config.num_hidden_layers}) with one code width, "
                             f"got {len(splices)} with widths {sorted(widths)}")
        return cls(config.num_hidden_layers, config.kv_lora_rank, widths.pop(), config.qk_rope_head_dim, dtype,
                   block_size, kv_cache_dtype)

    # -- what is stored -----------------------------------------------------------------------------

    @property
    def code_dtype(self) -> torch.dtype:
        return fp8_dtype(self.kv_cache_dtype) or self.dtype

    @property
    def quantized(self) -> bool:
        return fp8_dtype(self.kv_cache_dtype) is not None

    @property
    def storage_dtype(self) -> torch.dtype:
        """The cache tensor's dtype: raw bytes for fp8 rows, the model dtype otherwise."""
        return torch.uint8 if self.quantized else self.dtype

    @property
    def row_size(self) -> int:
        """Elements of storage_dtype per token and layer (the cache tensor's last dimension)."""
        if not self.quantized:
            return self.width
        return self._rope_offset + _align(self.rope_dim * self.bytes_per_value)

    @property
    def _scale_offset(self) -> int:
        return _align(self.code_dim)  # fp8: one byte per code value

    @property
    def _rope_offset(self) -> int:
        return self._scale_offset + _align(SCALE_BYTES)

    def views(self, cache: Tensor) -> CacheViews:
        """Cut one layer's cache [N, block_size, row_size] into its typed parts."""
        if not self.quantized:
            return CacheViews.of(cache, self.code_dim)
        scale_end = self._scale_offset + SCALE_BYTES
        return CacheViews(
            tensor=cache,
            code=cache[..., :self.code_dim].view(self.code_dtype),
            rope=cache[..., self._rope_offset:self._rope_offset + self.rope_dim * self.bytes_per_value].view(self.dtype),
            scale=cache[..., self._scale_offset:scale_end].view(torch.float32).squeeze(-1),
        )

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
        return self.row_size * torch.empty((), dtype=self.storage_dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_per_layer * self.num_layers

    @property
    def rope_bytes_per_token(self) -> int:
        return self.rope_dim * self.bytes_per_value * self.num_layers

    @property
    def code_bytes_per_token(self) -> int:
        """Everything but the RoPE key: the code, and for fp8 its scale and alignment padding."""
        return self.bytes_per_token - self.rope_bytes_per_token

    def block_bytes(self, num_layers: int | None = None) -> int:
        """Bytes of one block over `num_layers` layers (all of them by default)."""
        layers = self.num_layers if num_layers is None else num_layers
        return self.bytes_per_token_per_layer * self.block_size * layers

    def describe(self) -> str:
        """One line for logs: what a token costs and why."""
        if self.quantized:
            row = (f"({self.code_dim} fp8 code + scale, {self.rope_dim} RoPE x {self.bytes_per_value} B, "
                   f"{ALIGN}-byte aligned) = {self.bytes_per_token_per_layer} B")
        else:
            row = f"({self.code_dim} code + {self.rope_dim} RoPE values) x {self.bytes_per_value} B"
        return (f"{row} x {self.num_layers} layers = {self.bytes_per_token:,} B per token (compression ratio "
                f"{self.compression_ratio:g}, kv_cache_dtype {self.kv_cache_dtype}, blocks of {self.block_size} tokens)")
