"""rms_norm, add_rms_norm and silu_and_mul (server/kernels/norms.py, activation.py).

In pytest's process: the torch references against transformers' DeepseekV2RMSNorm and F.silu,
and the dispatch rules. In a child process under Triton's CPU interpreter (run_under_interpreter):
the kernels against the references, bit-exact where both round once in the same place.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so the child process (run as a script) finds `server`
    sys.path.insert(0, str(REPO_ROOT))

from tests.interpreter import run_under_interpreter  # noqa: E402
from tests.kernel_checks import assert_equal, assert_rel, run_checks  # noqa: E402

from server.kernels import triton_utils  # noqa: E402
from server.kernels.activation import silu_and_mul, silu_and_mul_torch  # noqa: E402
from server.kernels.norms import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch  # noqa: E402

EPS = 1e-6


def make(tokens: int, dim: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    """[T, dim] values; with pad > 0 a strided row view of a wider tensor (a fused output)."""
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(tokens, dim + pad, generator=gen) * 3).to(dtype)
    return full[:, :dim]


def norm_weight(dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)


def transformers_rms_norm(dim: int, weight: torch.Tensor):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    module = DeepseekV2RMSNorm(dim, eps=EPS)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return module


# ---------------------------------------------------------------- references (this process)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_is_transformers_rmsnorm(dtype):
    x, w = make(5, 48, dtype, seed=0), norm_weight(48, dtype, seed=1)
    want = transformers_rms_norm(48, w)(x)
    assert_equal(rms_norm_torch(x, w, EPS), want, "rms_norm_torch")
    assert_equal(rms_norm(x, w, EPS), want, "rms_norm on CPU (torch path)")


def test_rms_norm_reference_promotes_like_transformers():
    # An fp32 weight over bf16 activations gives fp32, as the module's `weight * normed` does.
    x, w = make(3, 40, torch.bfloat16, seed=2), norm_weight(40, torch.float32, seed=3)
    got = rms_norm_torch(x, w, EPS)
    assert got.dtype == torch.float32
    assert_equal(got, transformers_rms_norm(40, w)(x), "promoted rms_norm_torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_reference_is_norm_of_the_sum_and_updates_residual(dtype):
    x, residual = make(4, 48, dtype, seed=4), make(4, 48, dtype, seed=5)
    w = norm_weight(48, dtype, seed=6)
    want_sum = x + residual
    want = transformers_rms_norm(48, w)(want_sum)
    normed, new_residual = add_rms_norm_torch(x, residual, w, EPS)
    assert new_residual is residual  # in place
    assert_equal(new_residual, want_sum, "residual")
    assert_equal(normed, want, "normed")


def test_silu_and_mul_reference_is_fp32_silu_times_up():
    x = make(3, 2 * 37, torch.float32, seed=7)
    want = F.silu(x[:, :37]) * x[:, 37:]
    assert_rel(silu_and_mul_torch(x), want, 1e-6, "fp32")
    # bf16: one rounding of the fp32 value, within bf16 precision of transformers' two-step bf16.
    xb = x.bfloat16()
    got = silu_and_mul_torch(xb)
    assert got.dtype == torch.bfloat16
    exact = F.silu(xb[:, :37].float()) * xb[:, 37:].float()
    assert_equal(got, exact.bfloat16(), "bf16 rounded once")
    assert_rel(got, F.silu(xb[:, :37]) * xb[:, 37:], 1e-2, "bf16 vs bf16 silu*up")


def test_impl_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = make(2, 16, torch.float32, seed=8), norm_weight(16, torch.float32, seed=9)
    if triton_utils.HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            rms_norm(x, w, EPS, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        rms_norm(x, w, EPS, impl="cuda")
    monkeypatch.setenv("KVSPLICE_FORCE_TRITON", "1")  # honoured only under the interpreter
    assert not triton_utils.use_triton(x)


# ---------------------------------------------------------------- Triton kernels (child process)

def test_norm_kernels_under_interpreter_match_references():
    run_under_interpreter(__file__)


def check_rms_norm_shapes_and_dtypes() -> None:
    # Odd widths (masking), one token, strided rows, a width over one warp-group's 2048.
    for tokens, dim, pad, dtype in ((1, 48, 0, torch.float32), (5, 37, 11, torch.float32),
                                    (3, 48, 16, torch.bfloat16), (2, 3000, 0, torch.bfloat16),
                                    (4, 40, 0, torch.float16)):
        x, w = make(tokens, dim, dtype, seed=dim, pad=pad), norm_weight(dim, dtype, seed=dim + 1)
        got, want = rms_norm(x, w, EPS, impl="triton"), rms_norm_torch(x, w, EPS)
        if dtype == torch.float32:
            assert_rel(got, want, 1e-6, f"rms_norm T={tokens} D={dim}")
        else:  # one rounding of the normalised row, then an exact product rounded once: same bits
            assert_equal(got, want, f"rms_norm T={tokens} D={dim} {dtype}")


def check_rms_norm_promotion_and_out_buffer() -> None:
    x, w = make(3, 40, torch.bfloat16, seed=20), norm_weight(40, torch.float32, seed=21)
    out = torch.full((3, 40), float("nan"))
    got = rms_norm(x, w, EPS, out=out, impl="triton")
    assert got is out
    assert_equal(out, rms_norm_torch(x, w, EPS), "fp32 weight over bf16 x, into out=")


def check_add_rms_norm_in_place() -> None:
    for dim, dtype, res_dtype in ((48, torch.float32, torch.float32), (37, torch.bfloat16, torch.bfloat16),
                                  (40, torch.bfloat16, torch.float32)):
        x = make(4, dim, dtype, seed=dim, pad=5)  # strided rows
        residual = make(4, dim, res_dtype, seed=dim + 1)
        w = norm_weight(dim, dtype, seed=dim + 2)
        mine, theirs = residual.clone(), residual.clone()
        normed, new_residual = add_rms_norm(x, mine, w, EPS, impl="triton")
        want_normed, want_residual = add_rms_norm_torch(x, theirs, w, EPS)
        assert new_residual is mine, "the residual is updated in place and returned"
        # One fp32 add rounded to the residual's dtype in both: the same bits.
        assert_equal(mine, want_residual, f"residual {dtype} + {res_dtype}")
        if res_dtype == torch.float32:  # the fp32 mean is summed in another order: ulps apart
            assert_rel(normed, want_normed, 1e-6, f"normed {dtype} + {res_dtype}")
        else:
            assert_equal(normed, want_normed, f"normed {dtype} + {res_dtype}")


def check_silu_and_mul() -> None:
    # I=1500 spans two column programs (BLOCK 1024); strided rows; bf16 rounds once like the reference.
    for tokens, inter, pad, dtype in ((1, 24, 0, torch.float32), (3, 37, 6, torch.float32),
                                      (2, 1500, 0, torch.bfloat16), (5, 19, 3, torch.float16)):
        x = make(tokens, 2 * inter, dtype, seed=inter, pad=pad)
        got, want = silu_and_mul(x, impl="triton"), silu_and_mul_torch(x)
        if dtype == torch.float32:
            assert_rel(got, want, 1e-6, f"silu_and_mul I={inter}")
        else:
            assert_equal(got, want, f"silu_and_mul I={inter} {dtype}")


def check_zero_tokens() -> None:
    x, w = make(0, 16, torch.float32, seed=0), norm_weight(16, torch.float32, seed=1)
    assert rms_norm(x, w, EPS, impl="triton").shape == (0, 16)
    assert silu_and_mul(make(0, 32, torch.float32, seed=0), impl="triton").shape == (0, 16)


CHECKS = [check_rms_norm_shapes_and_dtypes, check_rms_norm_promotion_and_out_buffer, check_add_rms_norm_in_place,
          check_silu_and_mul, check_zero_tokens]

if __name__ == "__main__":
    sys.exit(run_checks(CHECKS))
