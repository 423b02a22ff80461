"""Fused kernels of the DeepSeek-V2 model: each a Triton kernel for CUDA, a torch reference with
the same math (any device), and a dispatcher that picks one (see triton_utils.use_triton)."""
from server.kernels.activation import silu_and_mul, silu_and_mul_torch
from server.kernels.fused_moe import (
    DEFAULT_CONFIGS, GemmTile, append_shared_experts, MoEConfig, fused_experts, fused_experts_looped, fused_experts_torch,
    fused_experts_triton, get_config,
)
from server.kernels.mla_cache import mla_write_kv, mla_write_kv_torch
from server.kernels.norms import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch
from server.kernels.router import grouped_topk, route, topk_softmax, topk_softmax_torch

__all__ = [
    "DEFAULT_CONFIGS", "GemmTile", "MoEConfig", "add_rms_norm", "append_shared_experts", "add_rms_norm_torch", "fused_experts",
    "fused_experts_looped", "fused_experts_torch", "fused_experts_triton", "get_config", "grouped_topk",
    "mla_write_kv", "mla_write_kv_torch", "rms_norm", "rms_norm_torch", "route", "silu_and_mul", "silu_and_mul_torch",
    "topk_softmax", "topk_softmax_torch",
]
