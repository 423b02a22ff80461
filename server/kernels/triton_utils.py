"""What every kernel module of `server.kernels` shares: the optional triton import, the choice
between the Triton kernel and the torch reference, and the CPU interpreter's workarounds.

Dispatch rule (`use_triton`): a call runs the Triton kernel when
  - `impl="triton"` (tests force it; on a CPU tensor that needs TRITON_INTERPRET=1), or
  - `impl=None` (the default), triton imports, and the tensor is on CUDA, or
  - `impl=None`, TRITON_INTERPRET=1 and KVSPLICE_FORCE_TRITON=1 (engine tests on CPU that want
    every kernel of a model to go through the interpreter without passing `impl` down).
`impl="torch"` always runs the reference. Nothing here reads device memory, so the choice never
syncs and a captured CUDA graph replays the same kernels.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every public function falls back to its torch reference
    triton = tl = None

HAS_TRITON = triton is not None
IMPLS = (None, "torch", "triton")
MIN_DOT = 16  # tl.dot needs every dimension >= 16


def jit(fn: Callable | None = None, **kwargs) -> Callable:
    """`triton.jit` when triton is installed; otherwise the plain function (never called), so the
    kernel modules still import and their torch references work on CPU-only installs."""
    def wrap(f: Callable) -> Callable:
        return triton.jit(f, **kwargs) if HAS_TRITON else f

    return wrap(fn) if fn is not None else wrap


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: Tensor, impl: str | None = None) -> bool:
    """True when the Triton kernel should run for inputs on `tensor`'s device (module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' but triton is not installed")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1")
        return True
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    return interpreting() and os.environ.get("KVSPLICE_FORCE_TRITON", "0") == "1"


def dot_fp32() -> bool:
    """The interpreter mis-computes tl.dot on bf16 operands: kernels upcast under this constexpr."""
    return interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands (tests, fp32 models) get exact dots, not TF32: correctness over speed there.
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pad_dim(n: int, minimum: int = 1) -> int:
    """Padded block width for a whole dimension kept in one tile (masked past n)."""
    return max(minimum, next_pow2(n))


def check_last_dim_contiguous(**tensors: Tensor) -> None:
    # Every kernel indexes columns with unit stride; rows may be strided (views of a fused output).
    for name, t in tensors.items():
        if t is not None and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride()})")


def _patch_interpreter_scalar_index() -> None:
    """Let the CPU interpreter use runtime loop bounds (`range(start, end)`) with numpy >= 2.4.

    The interpreter keeps scalars as 1-element arrays and converts them with int(array), which
    numpy 2.4 rejects for ndim > 0. Only ever applied when TRITON_INTERPRET=1 (tests, dry runs).
    (A copy of the helper in server/engine/triton_mla.py, which goes away with the old engine.)
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kvsplice_patched", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._kvsplice_patched = True
    interpreter._patch_lang_tensor = patched


def _patch_interpreter_rounding() -> None:
    """Make the CPU interpreter round fp32 -> bf16 and fp32 -> fp8 to nearest even, as the GPU does.

    Triton 3.6's interpreter truncates the bf16 cast (its generic cast passes no rounding mode),
    which doubles the bf16 error of every kernel under test and breaks bit-exact comparisons with
    torch; its fp8 cast loses the carry into the exponent (7.99 -> 4.0 in e4m3). Both go through
    torch's conversions here. Only ever applied when TRITON_INTERPRET=1.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl
    if getattr(original, "_kvsplice_patched", False):
        return

    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    original_fp_to_fp = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar in fp8:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            data = values.to(fp8[dst_type.scalar]).view(torch.uint8).numpy()
            return interpreter.TensorHandle(data.reshape(np.shape(src.data)), dst_type.scalar)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # stay a (quiet) NaN
            return interpreter.TensorHandle(rounded.reshape(np.shape(src.data)), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._kvsplice_patched = True
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp


if HAS_TRITON and interpreting():
    _patch_interpreter_scalar_index()
    _patch_interpreter_rounding()


__all__ = [
    "HAS_TRITON", "MIN_DOT", "check_last_dim_contiguous", "dot_fp32", "dot_precision", "interpreting",
    "jit", "next_pow2", "pad_dim", "tl", "triton", "use_triton",
]
