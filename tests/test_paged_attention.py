"""Paged MLA decode: the torch reference against a dense float64 computation, and the Triton kernel
(run by Triton's CPU interpreter in a subprocess) against the torch reference.

The interpreter needs TRITON_INTERPRET=1 before triton is imported, so the kernel checks run in a
child process (`python tests/test_paged_attention.py`); this process never imports triton.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so the child process (run as a script) finds `server`
    sys.path.insert(0, str(REPO_ROOT))

from tests.interpreter import TRITON_MISSING, run_under_interpreter  # noqa: E402

from kvsplice.cache_layout import CacheLayout, CacheViews  # noqa: E402
from kvsplice.kv_quant import dequantize, quantize  # noqa: E402
from server.kernels.mla_decode import paged_mla_decode, paged_mla_decode_torch  # noqa: E402



@dataclass
class DecodeCase:
    q_lat: torch.Tensor  # [B, H, r]
    q_pe: torch.Tensor  # [B, H, P]
    kv_cache: torch.Tensor  # [N, block_size, r + P]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32
    dense: list[torch.Tensor]  # per sequence [len, r + P]: the same tokens, unpaged
    scale: float


def make_case(
    lens: list[int], heads: int, r: int, p: int, block_size: int,
    dtype: torch.dtype = torch.float32, seed: int = 0, strided_queries: bool = False,
) -> DecodeCase:
    """Random queries and tokens, scattered over shuffled cache blocks; spare table slots hold
    random (valid) block ids, and unused cache blocks hold garbage that must never be read."""
    gen = torch.Generator().manual_seed(seed)
    width = r + p
    blocks_per_seq = [max(1, math.ceil(n / block_size)) for n in lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    kv_cache = torch.randn(num_blocks, block_size, width, generator=gen).mul_(1e4).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()

    table = torch.randint(0, num_blocks, (len(lens), max_blocks), generator=gen, dtype=torch.int32)
    dense = []
    for b, (n, used) in enumerate(zip(lens, blocks_per_seq)):
        ids = [order.pop() for _ in range(used)]
        table[b, :used] = torch.tensor(ids, dtype=torch.int32)
        tokens = torch.randn(n, width, generator=gen).to(dtype)
        for t in range(n):
            kv_cache[ids[t // block_size], t % block_size] = tokens[t]
        dense.append(tokens)

    if strided_queries:  # q_lat and q_pe as views of one [B, H, r + P] tensor, as a fused projection gives
        q = torch.randn(len(lens), heads, width, generator=gen).to(dtype)
        q_lat, q_pe = q[..., :r], q[..., r:]
    else:
        q_lat = torch.randn(len(lens), heads, r, generator=gen).to(dtype)
        q_pe = torch.randn(len(lens), heads, p, generator=gen).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return DecodeCase(q_lat, q_pe, kv_cache, table, lens_t, dense, scale=1.0 / math.sqrt(r + p))


def dense_decode_float64(case: DecodeCase) -> torch.Tensor:
    """Unpaged, per-sequence, float64 attention: the ground truth."""
    r = case.q_lat.shape[-1]
    outs = []
    for b, tokens in enumerate(case.dense):
        tokens = tokens.double()
        if tokens.shape[0] == 0:
            outs.append(torch.zeros(case.q_lat.shape[1], r, dtype=torch.float64))
            continue
        z, k_pe = tokens[:, :r], tokens[:, r:]
        scores = case.scale * (case.q_lat[b].double() @ z.T + case.q_pe[b].double() @ k_pe.T)
        outs.append(torch.softmax(scores, dim=-1) @ z)
    return torch.stack(outs)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def run_torch(case: DecodeCase, cache: torch.Tensor | CacheViews | None = None, **kwargs) -> torch.Tensor:
    return paged_mla_decode_torch(
        case.q_lat, case.q_pe, case.kv_cache if cache is None else cache, case.block_tables, case.context_lens,
        case.scale, **kwargs
    )


def fp8_cache(kv_cache: torch.Tensor, r: int, kv_cache_dtype: str = "fp8") -> CacheViews:
    """The same cache stored as the engine's fp8 rows: fp8 code + per-token scale, RoPE as is."""
    num_blocks, block_size, width = kv_cache.shape
    layout = CacheLayout(1, r, r, width - r, kv_cache.dtype, block_size, kv_cache_dtype)
    views = layout.views(torch.zeros(num_blocks, block_size, layout.row_size, dtype=layout.storage_dtype))
    values, scale = quantize(kv_cache[..., :r], views.code.dtype)
    views.code.copy_(values)
    views.scale.copy_(scale)
    views.rope.copy_(kv_cache[..., r:])
    return views


# ---------------------------------------------------------------- torch reference (this process)

def test_torch_reference_matches_dense_float64():
    block_size = 16
    lens = [1, block_size, block_size + 5, 3 * block_size - 1, 300]  # one, a block, ragged, long
    case = make_case(lens, heads=8, r=64, p=16, block_size=block_size)
    got = run_torch(case)
    assert got.shape == (len(lens), 8, 64) and got.dtype == torch.float32
    assert rel_err(got, dense_decode_float64(case)) < 1e-5


def test_torch_reference_block_size_one_and_large_blocks():
    for block_size in (1, 64):
        case = make_case([1, 7, 130], heads=3, r=24, p=8, block_size=block_size, seed=block_size)
        assert rel_err(run_torch(case), dense_decode_float64(case)) < 1e-5


def test_torch_reference_bf16_within_rounding():
    case = make_case([1, 33, 200], heads=16, r=128, p=64, block_size=16, dtype=torch.bfloat16)
    got = run_torch(case)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, dense_decode_float64(case)) < 1e-2


def test_max_context_len_bounds_the_gather_without_changing_the_result():
    case = make_case([5, 40, 17], heads=4, r=32, p=16, block_size=8, seed=1)
    full = run_torch(case)
    bounded = run_torch(case, max_context_len=40)
    torch.testing.assert_close(bounded, full, rtol=0, atol=0)


def test_empty_sequence_gives_zeros_not_nan():
    case = make_case([0, 9], heads=4, r=32, p=16, block_size=8, seed=2)
    got = run_torch(case)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert rel_err(got[1], dense_decode_float64(case)[1]) < 1e-5


def test_dispatcher_uses_torch_on_cpu_and_fills_out():
    case = make_case([3, 20], heads=4, r=32, p=16, block_size=8, seed=3)
    out = torch.full_like(case.q_lat, float("nan"))
    got = paged_mla_decode(
        case.q_lat, case.q_pe, case.kv_cache, case.block_tables, case.context_lens, case.scale, out=out
    )
    assert got is out
    torch.testing.assert_close(out, run_torch(case), rtol=0, atol=0)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_cache_decodes_like_its_dequantized_values(kv_cache_dtype):
    """The reference reads an fp8 cache as code * scale: the same as a float cache holding those
    values, and within fp8's rounding of the unquantized result."""
    case = make_case([1, 9, 40], heads=4, r=32, p=16, block_size=8)
    cache = fp8_cache(case.kv_cache, 32, kv_cache_dtype)
    dequantized = torch.cat([dequantize(cache.code, cache.scale), cache.rope], dim=-1)
    got = run_torch(case, cache)
    torch.testing.assert_close(got, run_torch(case, dequantized), rtol=1e-6, atol=1e-6)
    mantissa_bits = 3 if kv_cache_dtype == "fp8" else 2
    assert rel_err(got, run_torch(case)) < 2.0 ** -mantissa_bits


# ---------------------------------------------------------------- Triton kernel (child process)

def test_triton_kernel_under_interpreter_matches_torch():
    run_under_interpreter(__file__)


# (kind, lens, heads, r, P, block_size, dtype, options): each row exercises one path of the kernel.
INTERPRETER_CASES = [
    ("one split, H<16 padded, strided q", [1, 4, 7, 37], 4, 32, 16, 4, torch.float32,
     dict(num_splits=1, block_t=16, strided=True)),
    ("split-KV, empty splits", [1, 4, 7, 37], 4, 32, 16, 4, torch.float32, dict(num_splits=3, block_t=16)),
    ("heuristic (2 splits), bf16, empty seq", [0, 1, 16, 50], 16, 64, 16, 16, torch.bfloat16,
     dict(max_context_len=256)),
    ("split-KV bf16, V2-Lite P", [200, 16, 3], 16, 128, 64, 16, torch.bfloat16,
     dict(num_splits=4, block_t=32)),
    ("non-pow2 r/P/H, block > tile", [5, 64, 130], 20, 48, 24, 64, torch.float32,
     dict(num_splits=3, block_t=16)),
    ("fp8 cache, one split", [1, 4, 7, 37], 4, 32, 16, 4, torch.float32,
     dict(num_splits=1, block_t=16, kv_cache_dtype="fp8")),
    ("fp8 cache, split-KV bf16, V2-Lite P", [200, 16, 0], 16, 128, 64, 16, torch.bfloat16,
     dict(num_splits=4, block_t=32, kv_cache_dtype="fp8")),
    ("fp8_e5m2 cache, block > tile", [5, 64, 130], 20, 48, 24, 64, torch.float32,
     dict(num_splits=3, block_t=16, kv_cache_dtype="fp8_e5m2")),
]


def run_interpreter_checks() -> int:
    """Child-process entry point: kernel vs torch reference on every INTERPRETER_CASES row."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(exc)
        return TRITON_MISSING
    from server.kernels.mla_decode_triton import choose_num_splits, paged_mla_decode_triton

    # Makes torch.empty fill floats with NaN, so the kernel's scratch (split partials) is poisoned too:
    # a read of a partial that was never written shows up as NaN in the output.
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True

    failures = 0
    for seed, (kind, lens, heads, r, p, block_size, dtype, opts) in enumerate(INTERPRETER_CASES):
        opts = dict(opts)
        case = make_case(lens, heads, r, p, block_size, dtype, seed=seed, strided_queries=opts.pop("strided", False))
        kv_cache_dtype = opts.pop("kv_cache_dtype", None)
        cache = fp8_cache(case.kv_cache, r, kv_cache_dtype) if kv_cache_dtype else case.kv_cache
        want = run_torch(case, cache)
        out = torch.full_like(want, float("nan"))  # poisoned: every element must be written
        paged_mla_decode_triton(
            case.q_lat, case.q_pe, cache, case.block_tables, case.context_lens, case.scale,
            out=out, **opts,
        )
        err = rel_err(out, want)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        ok = not out.isnan().any().item() and err < tol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {kind:38s} {str(dtype):15s} rel_err={err:.2e} (tol {tol:g})")

    # The split heuristic: small batches with long contexts split, full batches and short contexts not.
    expected = {(1, 4224): 16, (32, 4224): 5, (128, 4224): 2, (256, 640): 1, (1, 100): 1, (16, 512): 4}
    for (batch, ctx), want_splits in expected.items():
        got = choose_num_splits(batch, ctx, num_sms=132)
        failures += got != want_splits
        print(f"{'ok  ' if got == want_splits else 'FAIL'} choose_num_splits({batch}, {ctx}) = {got}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_interpreter_checks())
