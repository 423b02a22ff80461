"""FP8 storage of the cached code: what `kv_cache_dtype=fp8` means, in one place.

The cached code of a token (the latent at ratio 1.0, the r-wide splice code below it) is stored
as fp8 values with one float32 scale per token: `q = round_fp8(code / s)`, `s = amax|code| / FP8_MAX`,
read back as `q * s`. The RoPE key stays in the model dtype, as in FlashMLA's layout: it is
64 of 576 values on DeepSeek-V2 and carries the position signal that rounding hurts most.

Why one scale per token (docs/quality.md, "FP8: which scales"): on the trained model's held-out
text, per-token, per-token-in-4-groups (FlashMLA's tiles), per-tensor and per-channel scales (the
last two static, from calibration text) all cost under 0.1% perplexity at ratios 1.0 and 0.5, and
their differences are within each other's 95% intervals. Per token needs no calibration and no
extra artefact, and cannot be broken by an outlier token; it costs 16 bytes per row (the scale,
aligned), 4% of a ratio-0.5 row, and the decode kernel one multiply per score.

The serving engine quantizes inside its cache-write kernel and dequantizes inside attention
(`server/kernels`); this module is the reference those kernels are tested against, and what the
patched transformers model applies (`fake_quantize`) so offline evaluation sees the same values.
"""
from __future__ import annotations

import torch
from torch import Tensor

# vLLM's names for --kv-cache-dtype; "auto" and "bf16" store the model dtype.
KV_CACHE_DTYPES = ("auto", "bf16", "fp8", "fp8_e4m3", "fp8_e5m2")
FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SCALE_BYTES = 4  # one float32 per token and layer
MIN_SCALE = 1e-12  # an all-zero code gets a finite scale (and zeros back)


def fp8_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The fp8 storage type for a --kv-cache-dtype name, None for the model dtype."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return FP8_DTYPES.get(kv_cache_dtype)


def storage_quantizer(kv_cache_dtype: str, model_dtype: torch.dtype):
    """What storing a code does to it, as a function of the code (None: nothing, the cache holds
    the model dtype). `bf16` in a float32 model rounds to bfloat16, so an fp32 evaluation of a
    bf16 cache sees the values the engine's cache would hold."""
    storage = fp8_dtype(kv_cache_dtype)
    if storage is not None:
        return lambda code: fake_quantize(code, storage)
    if kv_cache_dtype == "bf16" and model_dtype != torch.bfloat16:
        return lambda code: code.to(torch.bfloat16).to(code.dtype)
    return None


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)  # 448 for e4m3fn, 57344 for e5m2


def quantize(code: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """code [..., C] -> (fp8 values [..., C], float32 scale [...]): round to nearest, no overflow."""
    x = code.float()
    scale = (x.abs().amax(dim=-1) / fp8_max(dtype)).clamp_min(MIN_SCALE)
    limit = fp8_max(dtype)
    return (x / scale[..., None]).clamp(-limit, limit).to(dtype), scale


def dequantize(values: Tensor, scale: Tensor) -> Tensor:
    """The float32 code a stored (values, scale) pair stands for."""
    return values.float() * scale[..., None]


def fake_quantize(code: Tensor, dtype: torch.dtype) -> Tensor:
    """quantize then dequantize, in code's dtype: what attention sees of a code stored in fp8."""
    return dequantize(*quantize(code, dtype)).to(code.dtype)


__all__ = ["FP8_DTYPES", "KV_CACHE_DTYPES", "SCALE_BYTES", "dequantize", "fake_quantize", "fp8_dtype", "fp8_max",
           "quantize", "storage_quantizer"]
