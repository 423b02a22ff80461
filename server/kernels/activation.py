"""SwiGLU activation of the dense MLP (and of any gate/up projection fused into one [T, 2I] output).

    silu_and_mul(x) = silu(x[:, :I]) * x[:, I:]

Computed in fp32 and rounded once to x's dtype (F.silu(g) * u in bf16 rounds twice; the two agree
to bf16 precision, the fp32 reference here is the exact one).

Work mapping: grid (T, cdiv(I, BLOCK)); a program reads BLOCK gate and BLOCK up values of one row
and writes BLOCK outputs, so traffic is 3 * T * I elements, no reuse to exploit. Rows of x may
be strided (last dim contiguous). No host syncs: graph-capturable once compiled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from server.kernels.triton_utils import check_last_dim_contiguous, jit, pad_dim, tl, triton, use_triton

MAX_BLOCK = 1024  # columns per program: 8 per thread at 4 warps, long enough rows for full bursts


def silu_and_mul_torch(x: Tensor) -> Tensor:
    """[T, 2I] -> [T, I] in x's dtype, computed in fp32."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=ok, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: Tensor, out: Tensor | None = None, impl: str | None = None) -> Tensor:
    """x [T, 2I] -> [T, I] in x's dtype (or into `out`, contiguous last dim)."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2I], got {tuple(x.shape)}")
    inter = x.shape[1] // 2
    if not use_triton(x, impl):
        result = silu_and_mul_torch(x)
        return result if out is None else out.copy_(result)
    check_last_dim_contiguous(x=x)
    if out is None:
        out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    elif out.shape != (x.shape[0], inter) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{x.shape[0]}, {inter}] contiguous in its last dim")
    if x.shape[0] == 0:
        return out
    block = min(MAX_BLOCK, pad_dim(inter, 16))
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), I=inter, BLOCK=block, num_warps=4,
    )
    return out


__all__ = ["silu_and_mul", "silu_and_mul_torch"]
