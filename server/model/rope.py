"""Rotary position embedding as DeepSeek-V2 uses it: YaRN-scaled frequencies, interleaved pairs.

DeepSeek-V2 rotates the 64 RoPE dims of queries and keys as 32 complex numbers made of adjacent
pairs (x[2i], x[2i+1]) (transformers' `apply_rotary_emb` views them with `view_as_complex`). V2-Lite
extends its 4,096 pretraining positions 40x with YaRN: each frequency is blended between the
original and the interpolated one by a ramp over the rotation count, and cos/sin are scaled by the
attention factor (1.0 when mscale == mscale_all_dim, as in both V2 checkpoints). The softmax-scale
part of YaRN (mscale_all_dim) lives in the attention's `scale`, see `softmax_scale`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_parameters(config) -> dict:
    """transformers >= 5 standardises `rope_scaling` + `rope_theta` into `rope_parameters`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def inverse_frequencies(config) -> tuple[Tensor, float]:
    """(inv_freq [rope_dim / 2] float32, attention factor that multiplies cos and sin)."""
    params = _rope_parameters(config)
    dim, base = config.qk_rope_head_dim, float(params["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / base**exponents
    if params["rope_type"] in ("default", None):
        return extrapolated, 1.0
    if params["rope_type"] != "yarn":
        raise ValueError(f"rope type {params['rope_type']!r} is not supported (default or yarn)")
    factor = float(params["factor"])
    original = params["original_max_position_embeddings"]
    fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(fast), dim_for_rotations(slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep_extrapolated = 1 - ramp  # 1 for high frequencies (short wavelengths stay as trained)
    inv_freq = extrapolated / factor * ramp + extrapolated * keep_extrapolated
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                            if mscale and mscale_all else _yarn_mscale(factor))
    return inv_freq, float(attention_factor)


def softmax_scale(config) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 (DeepSeek-V2's choice)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = _rope_parameters(config)
    if params["rope_type"] not in ("default", None) and params.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(params["factor"]), params["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_positions), already times the attention factor."""

    def __init__(self, config, max_positions: int) -> None:
        super().__init__()
        inv_freq, factor = inverse_frequencies(config)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos() * factor, persistent=False)  # [max_positions, rope_dim / 2]
        self.register_buffer("sin", angles.sin() * factor, persistent=False)

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [..., P] by angles whose cos/sin are [..., P / 2] (broadcast)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
