"""RMSNorm and fused residual-add + RMSNorm (DeepSeek-V2's input/post-attention norms, the q_a and
kv_a norms): Triton kernels and torch references with the same math.

Semantics (transformers' DeepseekV2RMSNorm):
    rms_norm(x) = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)
The normalised row is rounded to x's dtype BEFORE the multiply by the weight, and the product is
in torch's promoted dtype of (weight, x), exactly as the module computes it; the kernel does the
multiply in fp32 and rounds once, which equals torch's bf16/fp16 product (the fp32 product of two
bf16/fp16 numbers is exact).
    add_rms_norm(x, residual) = (rms_norm(residual + x), residual + x)
The sum is rounded to residual's dtype, written into `residual` IN PLACE (both paths), and that
rounded sum is what gets normalised (vLLM's fused_add_rms_norm convention).

Work mapping: one program per row; the whole row (D padded to a power of two, masked) sits in
registers, so x is read once and the output written once: 2 * T * D elements of traffic (3 reads
+ 2 writes for the fused add). D up to 16384 (the widest DeepSeek norm is 7168 wide).
Rows may be strided (a view of a fused projection output); the last dimension must be contiguous.
No host syncs: graph-capturable once compiled (run one call eagerly before capture).
"""
from __future__ import annotations

import torch
from torch import Tensor

from server.kernels.triton_utils import check_last_dim_contiguous, jit, pad_dim, tl, triton, use_triton

MAX_D = 16384  # one row per program in registers; wider rows would spill


# ----------------------------------------------------------------------------- torch references

def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' DeepseekV2RMSNorm, any device, any float dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_torch(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """residual += x (in place, in residual's dtype); returns (rms_norm(residual), residual)."""
    residual.copy_(residual.float() + x.float())
    return rms_norm_torch(residual, weight, eps), residual


# ----------------------------------------------------------------------------- Triton kernels

@jit
def _normalise_row(s, w_ptr, cols, col_ok, D: tl.constexpr, eps, IN_DTYPE: tl.constexpr):
    """weight * round_to_input_dtype(s * rsqrt(mean(s^2) + eps)), fp32; masked lanes of s are 0."""
    var = tl.sum(s * s, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    normed = (s * rstd).to(IN_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return w * normed


@jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, eps,
                     D: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: T * stride can exceed 2**31 at long prefills
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=col_ok, other=0.0)
    y = _normalise_row(x.to(tl.float32), w_ptr, cols, col_ok, D, eps, x.dtype)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


@jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_res, stride_out, eps,
                         D: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=col_ok, other=0.0)
    res = tl.load(res_ptr + row * stride_res + cols, mask=col_ok, other=0.0)
    # The sum is rounded to the residual stream's dtype first: what is stored is what is normalised.
    s = (x.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
    tl.store(res_ptr + row * stride_res + cols, s, mask=col_ok)
    y = _normalise_row(s.to(tl.float32), w_ptr, cols, col_ok, D, eps, res.dtype)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


def _launch_options(dim: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): 4 warps cover 2048 values at 16 per thread; wider rows get more warps
    so no thread holds more than 32 fp32 values."""
    block = pad_dim(dim, 16)
    return block, min(16, max(1, block // 512))


def _out_like(x: Tensor, weight: Tensor, out: Tensor | None) -> Tensor:
    dtype = torch.promote_types(x.dtype, weight.dtype)  # what `weight * normed` gives in torch
    if out is None:
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    if out.shape != x.shape or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(x.shape)} {dtype} tensor contiguous in its last dim")
    return out


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [T, D] and [D]")
    if x.shape[1] > MAX_D:
        raise ValueError(f"D={x.shape[1]} exceeds the one-row-per-program limit {MAX_D}")
    check_last_dim_contiguous(x=x, weight=weight)


# ----------------------------------------------------------------------------- public API

def rms_norm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None,
             impl: str | None = None) -> Tensor:
    """x [T, D] (rows may be strided), weight [D] -> [T, D] in promote_types(x, weight)."""
    if not use_triton(x, impl):
        result = rms_norm_torch(x, weight, eps)
        return result if out is None else out.copy_(result)
    _check(x, weight)
    out = _out_like(x, weight, out)
    if x.shape[0] == 0:
        return out
    block, warps = _launch_options(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](
        x, weight, out, x.stride(0), out.stride(0), eps, D=x.shape[1], BLOCK_D=block, num_warps=warps,
    )
    return out


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, out: Tensor | None = None,
                 impl: str | None = None) -> tuple[Tensor, Tensor]:
    """residual += x in place; returns (rms_norm(residual) [T, D], residual). x and residual may
    have different dtypes (the sum takes residual's); rows of both may be strided."""
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    if not use_triton(x, impl):
        normed, residual = add_rms_norm_torch(x, residual, weight, eps)
        return (normed if out is None else out.copy_(normed)), residual
    _check(residual, weight)
    check_last_dim_contiguous(x=x)
    out = _out_like(residual, weight, out)
    if x.shape[0] == 0:
        return out, residual
    block, warps = _launch_options(x.shape[1])
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, out, x.stride(0), residual.stride(0), out.stride(0), eps,
        D=x.shape[1], BLOCK_D=block, num_warps=warps,
    )
    return out, residual


__all__ = ["add_rms_norm", "add_rms_norm_torch", "rms_norm", "rms_norm_torch"]
