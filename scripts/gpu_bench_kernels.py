"""Check, time and tune the fused kernels of server/kernels on one GPU, in one run (~3 min, H200).

    python scripts/gpu_bench_kernels.py --out $OUT/kernels_bench.json   # GPU: checks, timings, MoE sweep
    python scripts/gpu_bench_kernels.py --dry-run                       # CPU: Triton interpreter, tiny sizes
    python scripts/gpu_bench_kernels.py --aot                           # any machine: sm_90 compile of every
                                                                        # kernel and sweep candidate (regs/spills/smem)

For every kernel (rms_norm, add_rms_norm, silu_and_mul, topk_softmax, mla_write_kv, the fused MoE)
on fresh random inputs at DeepSeek-V2-Lite sizes: the Triton output (every output buffer
NaN-poisoned first, so unwritten elements show) against the torch reference, relative error
||out - ref|| / ||ref|| <= 1e-2 in bf16; then times (triton.testing.do_bench, median, L2 flushed,
replayed from a CUDA graph: at these sizes a kernel is launch-bound otherwise) and bytes moved
against the measured device copy bandwidth.
Fused MoE (E = 64 routed + 2 shared experts = 66, I = 1408, H = 2048, top-6 + 2 shared = 8 per
token, bf16) at T in {1, ..., 16384}: a sweep of a few tile configs per T (each GEMM timed
alone, for each BLOCK_M candidate; every candidate's output compared with the default's), the
best config checked end to end against the torch reference and timed against the defaults and
torch's grouped GEMM (torch._grouped_mm; a per-expert loop where that is missing), with GB/s and
TFLOP/s. The best table is written as JSON (--config-out, default: fused_moe_h200.json next to
--out) in the format server/kernels/fused_moe.py loads from server/kernels/configs/.
Every part is wrapped: a failure is reported in its row and the run goes on. --budget-s bounds
the run: past 80% of it the remaining token counts are timed with their default config only.
A short table is printed last; the full JSON goes to --out (default $OUT/kernels_bench.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--aot", action="store_true", help="compile for sm_90 without a GPU; report resources")
    parser.add_argument("--budget-s", type=float, default=210.0, help="sweep only while under 80%% of this")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default $OUT/kernels_bench.json)")
    parser.add_argument("--config-out", type=Path, default=None,
                        help="MoE config table JSON (default: fused_moe_h200.json next to --out)")
    parser.add_argument("--tokens", type=str, default=None, help="comma-separated MoE token counts (override)")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from server.kernels import fused_moe as fm  # noqa: E402
from server.kernels.activation import _silu_and_mul_kernel, silu_and_mul, silu_and_mul_torch  # noqa: E402
from server.kernels.fused_moe import DEFAULT_CONFIGS, GemmTile, MoEConfig  # noqa: E402
from server.kernels.mla_cache import _mla_write_kv_kernel, mla_write_kv, mla_write_kv_torch  # noqa: E402
from server.kernels.norms import (  # noqa: E402
    _add_rms_norm_kernel, _rms_norm_kernel, add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch,
)
from server.kernels.router import _topk_softmax_kernel, topk_softmax, topk_softmax_torch  # noqa: E402

START = time.perf_counter()
DEVICE = torch.device("cuda" if not (ARGS.dry_run or ARGS.aot) else "cpu")
DTYPE = torch.bfloat16
TOLERANCE = 1e-2
PEAK_TFLOPS = 790.0  # dense bf16 matrix throughput seen on this H200 (device notes); a yardstick only
EPS = 1e-6


@dataclass(frozen=True)
class Sizes:
    hidden: int
    latent: int  # kv_lora_rank
    rope: int
    heads: int
    code: int  # splice rank at ratio 0.5
    dense_inter: int
    routed: int
    shared: int
    top_k: int
    moe_inter: int
    max_pos: int
    block_size: int

    @property
    def experts(self) -> int:
        return self.routed + self.shared


LITE = Sizes(hidden=2048, latent=512, rope=64, heads=16, code=256, dense_inter=10944, routed=64, shared=2,
             top_k=6, moe_inter=1408, max_pos=8192, block_size=16)
TINY = Sizes(hidden=48, latent=40, rope=8, heads=3, code=20, dense_inter=24, routed=6, shared=2, top_k=2,
             moe_inter=24, max_pos=64, block_size=4)
S = TINY if ARGS.dry_run else LITE
SMALL_TOKENS = (1, 3) if ARGS.dry_run else (1, 64, 4096)
MOE_TOKENS = (1, 5, 40) if ARGS.dry_run else (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
if ARGS.tokens:
    MOE_TOKENS = tuple(int(t) for t in ARGS.tokens.split(","))


# ----------------------------------------------------------------------------- timing helpers

def elapsed() -> float:
    return time.perf_counter() - START


def capture(fn: Callable[[], Any]) -> "torch.cuda.CUDAGraph":
    """CUDA graph of fn after two eager runs on a side stream (they compile the kernels)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def bench_us(fn: Callable[[], Any], graph: bool = True, rep_ms: int = 20) -> float:
    """Median microseconds; from a CUDA graph when `graph`. Off the GPU: one wall-clock run."""
    if DEVICE.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    if graph:
        g = capture(fn)
        ms = triton.testing.do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median")
        del g
    else:
        fn()
        ms = triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")
    return ms * 1e3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||; NaN anywhere in got (an unwritten element) gives inf."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = DTYPE, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), device=DEVICE) * scale).to(dtype)


def measure_copy_gbps() -> float | None:
    """Device copy bandwidth (read + write bytes / time) of a 1 GiB buffer: the yardstick."""
    if DEVICE.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- small kernels

@dataclass
class Case:
    """One kernel at one size: the Triton call on static buffers, the reference, a check."""

    kernel: str
    tokens: int
    params: dict
    run: Callable[[], Any]
    run_ref: Callable[[], Any]
    check: Callable[[], float]  # fresh NaN-poisoned Triton run vs the reference: relative error
    nbytes: int


def case_rms(tokens: int) -> Case:
    d = S.hidden
    x = randn(tokens, d + 64, seed=1)[:, :d]  # a strided row view, as a fused output gives
    w = randn(d, seed=2, scale=0.1) + 1
    out = torch.empty(tokens, d, dtype=DTYPE, device=DEVICE)

    def check() -> float:
        out.fill_(float("nan"))
        rms_norm(x, w, EPS, out=out, impl="triton")
        return rel_err(out, rms_norm_torch(x, w, EPS))

    return Case("rms_norm", tokens, dict(D=d, strided=True), lambda: rms_norm(x, w, EPS, out=out, impl="triton"),
                lambda: rms_norm_torch(x, w, EPS), check, 2 * tokens * d * 2 + d * 2)


def case_add_rms(tokens: int) -> Case:
    d = S.hidden
    x = randn(tokens, d, seed=3)
    residual = randn(tokens, d, seed=4)
    w = randn(d, seed=5, scale=0.1) + 1
    out = torch.empty_like(x)
    timed_res, ref_res = residual.clone(), residual.clone()

    def check() -> float:
        mine, theirs = residual.clone(), residual.clone()
        out.fill_(float("nan"))
        add_rms_norm(x, mine, w, EPS, out=out, impl="triton")
        normed, summed = add_rms_norm_torch(x, theirs, w, EPS)
        return max(rel_err(out, normed), rel_err(mine, summed))

    return Case("add_rms_norm", tokens, dict(D=d), lambda: add_rms_norm(x, timed_res, w, EPS, out=out, impl="triton"),
                lambda: add_rms_norm_torch(x, ref_res, w, EPS), check, 4 * tokens * d * 2 + d * 2)


def case_silu(tokens: int) -> Case:
    inter = S.dense_inter
    x = randn(tokens, 2 * inter, seed=6)
    out = torch.empty(tokens, inter, dtype=DTYPE, device=DEVICE)

    def check() -> float:
        out.fill_(float("nan"))
        silu_and_mul(x, out=out, impl="triton")
        return rel_err(out, silu_and_mul_torch(x))

    return Case("silu_and_mul", tokens, dict(I=inter), lambda: silu_and_mul(x, out=out, impl="triton"),
                lambda: silu_and_mul_torch(x), check, 3 * tokens * inter * 2)


def case_topk(tokens: int) -> Case:
    logits = randn(tokens, S.routed, seed=7, dtype=torch.float32)
    args = (S.top_k, S.shared, False, 1.0)

    def check() -> float:
        w, ids = topk_softmax(logits, *args, impl="triton")
        w_ref, ids_ref = topk_softmax_torch(logits, *args)
        # Weights come sorted in both, so a near-tie resolved differently still matches here;
        # rows whose ids differ are counted and may be at most 1 in 1000 (fp32 rounding ties).
        mismatched = (ids != ids_ref).any(dim=1).sum().item()
        return rel_err(w, w_ref) if mismatched <= tokens // 1000 else math.inf

    width = S.top_k + S.shared
    return Case("topk_softmax", tokens, dict(E=S.routed, top_k=S.top_k, shared=S.shared),
                lambda: topk_softmax(logits, *args, impl="triton"), lambda: topk_softmax_torch(logits, *args),
                check, tokens * S.routed * 4 + tokens * width * 8)


def rope_tables() -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, S.rope, 2, device=DEVICE).float() / S.rope))
    angles = torch.arange(S.max_pos, device=DEVICE).float()[:, None] * inv_freq[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def case_mla(tokens: int, splice: bool) -> Case:
    code = S.code if splice else S.latent
    width = S.latent + S.rope + (S.code if splice else 0)
    fused = randn(tokens, width + 32, seed=8)  # the fused projection output the views come from
    latent, k_pe = fused[:, :S.latent], fused[:, S.latent:S.latent + S.rope]
    z_raw = fused[:, S.latent + S.rope:width] if splice else None
    q = randn(tokens, S.heads, 128 + S.rope, seed=9)
    cos, sin = rope_tables()
    positions = torch.randint(0, S.max_pos, (tokens,), generator=gen(10), device=DEVICE)
    num_blocks = triton.cdiv(tokens, S.block_size) + 2
    slots = torch.randperm(num_blocks * S.block_size, generator=gen(11), device=DEVICE)[:tokens]
    cache = torch.zeros(num_blocks, S.block_size, code + S.rope, dtype=DTYPE, device=DEVICE)
    stored = torch.empty(tokens, code + S.rope, dtype=DTYPE, device=DEVICE)
    kw = dict(norm_weight=None if splice else randn(S.latent, seed=12, scale=0.1) + 1, eps=EPS, z_raw=z_raw,
              z_bias=randn(code, seed=13, scale=0.1) if splice else None)

    def call(q_pe: torch.Tensor, kv: torch.Tensor, out: torch.Tensor | None, fn=mla_write_kv, **extra):
        return fn(latent, k_pe, q_pe, positions, cos, sin, kv, slots, stored=out, **kw, **extra)

    def check() -> float:
        q_mine, q_ref = q.clone(), q.clone()
        kv_mine, kv_ref = torch.full_like(cache, float("nan")), torch.full_like(cache, float("nan"))
        stored.fill_(float("nan"))
        call(q_mine[..., 128:], kv_mine, stored, impl="triton")
        want = call(q_ref[..., 128:], kv_ref, None, fn=mla_write_kv_torch)
        rows = (slots // S.block_size, slots % S.block_size)
        return max(rel_err(stored, want), rel_err(kv_mine[rows], kv_ref[rows]), rel_err(q_mine, q_ref))

    q_timed, q_ref_timed = q.clone(), q.clone()
    nbytes = tokens * (2 * (width + 2 * S.heads * S.rope + 2 * (code + S.rope)) + 4 * S.rope)
    return Case("mla_write_kv", tokens, dict(splice=splice, C=code, P=S.rope, NH=S.heads),
                lambda: call(q_timed[..., 128:], cache, stored, impl="triton"),
                lambda: call(q_ref_timed[..., 128:], cache, None, fn=mla_write_kv_torch), check, nbytes)


def run_small_kernels(copy_gbps: float | None) -> list[dict]:
    rows = []
    builders = [case_rms, case_add_rms, case_silu, case_topk,
                lambda t: case_mla(t, splice=False), lambda t: case_mla(t, splice=True)]
    for build in builders:
        for tokens in SMALL_TOKENS:
            row: dict = dict(tokens=tokens)
            try:
                case = build(tokens)
                row.update(kernel=case.kernel, **case.params, nbytes=case.nbytes)
                err = case.check()
                row.update(rel_err=err, ok=err <= TOLERANCE)
                row["triton_us"] = bench_us(case.run)
                row["torch_us"] = try_bench(case.run_ref)
                gbps = case.nbytes / (row["triton_us"] * 1e-6) / 1e9
                row.update(gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps if copy_gbps else None)
            except Exception as exc:  # noqa: BLE001
                row.update(ok=False, error=short(exc), trace=traceback.format_exc(limit=3))
            row["elapsed_s"] = round(elapsed(), 1)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
            rows.append(row)
    return rows


def try_bench(fn: Callable[[], Any]) -> float | None:
    """Graph timing, else eager (a reference that cannot be captured), else None."""
    for graph in (True, False):
        try:
            return bench_us(fn, graph=graph)
        except Exception:  # noqa: BLE001
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
    return None


# ----------------------------------------------------------------------------- MoE inputs

@dataclass
class MoEWeights:
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]


def make_weights() -> MoEWeights:
    # Scaled so activations stay O(1): the relative error then measures rounding, not overflow.
    w13 = randn(S.experts, 2 * S.moe_inter, S.hidden, seed=20, scale=S.hidden ** -0.5)
    w2 = randn(S.experts, S.hidden, S.moe_inter, seed=21, scale=S.moe_inter ** -0.5)
    return MoEWeights(w13, w2)


def make_routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], ids int32 [T, 8] and weights [T, 8] from the Triton router on random logits
    (top-6 of 64 routed experts, then the 2 shared experts with weight 1)."""
    x = randn(tokens, S.hidden, seed=seed)
    logits = randn(tokens, S.routed, seed=seed + 1, dtype=torch.float32, scale=2.0)
    weights, ids = topk_softmax(logits, S.top_k, num_shared=S.shared, impl="triton")
    return x, ids, weights


def moe_reference(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, wt: MoEWeights) -> torch.Tensor:
    """fp32 torch reference: the gather reference for small T, the fp32 per-expert loop above
    (same math; the gather would need [T, 2I, H] fp32 per k)."""
    if x.shape[0] <= 16:
        return fm.fused_experts_torch(x, ids, w, wt.w13, wt.w2)
    return fm.fused_experts_looped(x, ids, w, wt.w13, wt.w2, compute_dtype=torch.float32)


def grouped_mm_moe(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, wt: MoEWeights) -> torch.Tensor:
    """torch's grouped GEMM path (as transformers' grouped_mm experts): pairs sorted by expert,
    torch._grouped_mm for gate/up and down, weighted index_add_. No host sync: capturable."""
    tokens, top_k = ids.shape
    inter = wt.w2.shape[-1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(S.experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    rows = order // top_k
    gate_up = torch._grouped_mm(x[rows], wt.w13.transpose(1, 2), offs=offs)
    h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, wt.w2.transpose(1, 2), offs=offs).float() * w.reshape(-1)[order, None]
    return torch.zeros(tokens, S.hidden, dtype=torch.float32, device=x.device).index_add_(0, rows, y).to(x.dtype)


def baseline_moe() -> tuple[str, Callable, bool]:
    """(name, fn, graph-capturable). The per-expert loop reads counts on the host: capturing it
    would fail mid-capture, so it is only ever timed eagerly."""
    if hasattr(torch, "_grouped_mm") and DEVICE.type == "cuda":
        return "torch._grouped_mm", grouped_mm_moe, True
    return "per-expert loop", lambda x, ids, w, wt: fm.fused_experts_looped(x, ids, w, wt.w13, wt.w2), False


# ----------------------------------------------------------------------------- MoE sweep

def tiles(*rows: tuple[int, int, int, int, int]) -> list[GemmTile]:
    return [GemmTile(*r) for r in rows]


# (BLOCK_N, BLOCK_K, GROUP_M, warps, stages); up BLOCK_N counts gate columns (as many up columns).
# Decode (memory bound): narrow tiles, many programs in flight, long K chunks for wide loads.
UP_SMALL = tiles((32, 128, 1, 4, 4), (64, 128, 1, 4, 3), (32, 256, 1, 4, 3), (16, 256, 1, 4, 3), (64, 64, 1, 4, 5))
DOWN_SMALL = tiles((64, 128, 1, 4, 4), (128, 128, 1, 4, 3), (32, 256, 1, 4, 3), (64, 256, 1, 4, 3), (128, 64, 1, 4, 5))
UP_MID = tiles((64, 64, 1, 4, 4), (64, 128, 1, 4, 3), (128, 64, 1, 8, 4), (32, 128, 1, 4, 4))
DOWN_MID = tiles((128, 64, 1, 4, 4), (128, 128, 1, 8, 3), (256, 64, 1, 8, 4), (64, 128, 1, 4, 4))
# Prefill (compute bound): big tiles, GROUP_M swizzling for L2 reuse of the weight tiles.
UP_LARGE = tiles((128, 64, 1, 8, 4), (128, 64, 8, 8, 4), (64, 64, 8, 4, 4), (64, 128, 8, 8, 3))
DOWN_LARGE = tiles((256, 64, 1, 8, 4), (256, 64, 8, 8, 4), (128, 64, 8, 4, 4), (128, 128, 8, 8, 3))


def default_config(tokens: int) -> MoEConfig:
    keys = sorted(DEFAULT_CONFIGS)
    return DEFAULT_CONFIGS[next((k for k in keys if k >= tokens), keys[-1])]


def sweep_space(tokens: int, full: bool) -> list[tuple[int, list[GemmTile], list[GemmTile]]]:
    """[(BLOCK_M, up candidates, down candidates)], the default config's tiles first."""
    dflt = default_config(tokens)
    if not full:
        return [(dflt.block_m, [dflt.up], [dflt.down])]
    if tokens <= 16:
        bms, ups, downs = [16], UP_SMALL, DOWN_SMALL
    elif tokens <= 64:
        bms, ups, downs = [16, 32], UP_SMALL, DOWN_SMALL
    elif tokens <= 256:
        bms, ups, downs = [32, 64], UP_MID, DOWN_MID
    else:
        bms, ups, downs = [64, 128], UP_LARGE, DOWN_LARGE
    if ARGS.dry_run:
        ups, downs = [GemmTile(16, 16)], [GemmTile(16, 32)]
    bms = [dflt.block_m] + [b for b in bms if b != dflt.block_m]
    return [(bm, [dflt.up] + [t for t in ups if t != dflt.up], [dflt.down] + [t for t in downs if t != dflt.down])
            for bm in bms]


@dataclass
class StageResult:
    tile: GemmTile
    us: float | None = None
    rel_err: float | None = None  # against the first (default) candidate's output
    error: str | None = None


def time_up_tiles(x, ids, wt, align, candidates) -> tuple[list[StageResult], torch.Tensor | None]:
    """Each gate/up tile: output (valid rows) vs the first tile's, and its graph time."""
    rows = align.num_padded.item()  # host read: fine here, the kernels themselves never sync
    results, first = [], None
    act = torch.empty(align.sorted_ids.shape[0], S.moe_inter, dtype=DTYPE, device=DEVICE)
    for tile in candidates:
        res = StageResult(tile)
        try:
            act.fill_(float("nan"))
            fm.moe_gemm_up(x, wt.w13, ids.shape[1], align, tile, act=act)
            first = act[:rows].clone() if first is None else first
            res.rel_err = rel_err(act[:rows], first)
            res.us = bench_us(lambda: fm.moe_gemm_up(x, wt.w13, ids.shape[1], align, tile, act=act))
        except Exception as exc:  # noqa: BLE001
            res.error = short(exc)
        results.append(res)
    return results, first


def time_down_tiles(act, w, wt, align, candidates) -> list[StageResult]:
    results, first = [], None
    ybuf = torch.empty(align.num_pairs, S.hidden, dtype=DTYPE, device=DEVICE)
    for tile in candidates:
        res = StageResult(tile)
        try:
            ybuf.fill_(float("nan"))
            fm.moe_gemm_down(act, wt.w2, w, align, tile, DTYPE, ybuf=ybuf)
            first = ybuf.clone() if first is None else first
            res.rel_err = rel_err(ybuf, first)
            res.us = bench_us(lambda: fm.moe_gemm_down(act, wt.w2, w, align, tile, DTYPE, ybuf=ybuf))
        except Exception as exc:  # noqa: BLE001
            res.error = short(exc)
        results.append(res)
    return results


def best(results: list[StageResult]) -> StageResult | None:
    good = [r for r in results if r.us is not None and r.rel_err is not None and r.rel_err <= TOLERANCE]
    return min(good, key=lambda r: r.us) if good else None


def sweep_block_m(x, ids, w, wt, bm, ups, downs) -> dict:
    """Alignment + best up + best down + sum at one BLOCK_M, all timed from graphs."""
    entry: dict = dict(block_m=bm)
    align = fm.moe_align(ids, S.experts, bm)
    entry["align_us"] = bench_us(lambda: fm.moe_align(ids, S.experts, bm))
    up_results, act = time_up_tiles(x, ids, wt, align, ups)
    entry["up"] = [dict(asdict(r.tile), us=r.us, rel_err=r.rel_err, error=r.error) for r in up_results]
    best_up = best(up_results)
    if best_up is None or act is None:
        return entry
    act_full = torch.zeros(align.sorted_ids.shape[0], S.moe_inter, dtype=DTYPE, device=DEVICE)
    fm.moe_gemm_up(x, wt.w13, ids.shape[1], align, best_up.tile, act=act_full)
    down_results = time_down_tiles(act_full, w, wt, align, downs)
    entry["down"] = [dict(asdict(r.tile), us=r.us, rel_err=r.rel_err, error=r.error) for r in down_results]
    best_down = best(down_results)
    if best_down is None:
        return entry
    ybuf = fm.moe_gemm_down(act_full, wt.w2, w, align, best_down.tile, DTYPE)
    out = torch.empty_like(x)
    entry["sum_us"] = bench_us(lambda: fm.moe_sum(ybuf, ids, S.experts, out))
    entry["total_us"] = entry["align_us"] + best_up.us + best_down.us + entry["sum_us"]
    entry["config"] = MoEConfig(bm, best_up.tile, best_down.tile).to_dict()
    return entry


def check_pipeline(x, ids, w, wt, cfg: MoEConfig, ref: torch.Tensor) -> float:
    out = torch.full_like(x, float("nan"))
    fm.fused_experts_triton(x, ids, w, wt.w13, wt.w2, config=cfg, out=out)
    return rel_err(out, ref)


def moe_numbers(tokens: int, ids: torch.Tensor, us: float | None, copy_gbps: float | None) -> dict:
    """Bytes: the distinct experts' weights + x in + out (the floor); FLOPs: 6 T K I H."""
    distinct = int(torch.unique(ids).numel())
    nbytes = distinct * 3 * S.moe_inter * S.hidden * 2 + 2 * tokens * S.hidden * 2
    flops = 6 * tokens * ids.shape[1] * S.moe_inter * S.hidden
    row = dict(distinct_experts=distinct, nbytes=nbytes, flops=flops)
    if us:
        gbps = nbytes / (us * 1e-6) / 1e9
        row.update(gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps if copy_gbps else None,
                   tflops=flops / (us * 1e-6) / 1e12)
    return row


def run_moe_tokens(tokens: int, wt: MoEWeights, copy_gbps: float | None) -> dict:
    full_sweep = elapsed() < 0.8 * ARGS.budget_s
    row: dict = dict(tokens=tokens, swept=full_sweep)
    x, ids, w = make_routing(tokens, seed=100 + tokens)
    ref = moe_reference(x, ids, w, wt)
    sweeps = []
    for bm, ups, downs in sweep_space(tokens, full_sweep):
        try:
            sweeps.append(sweep_block_m(x, ids, w, wt, bm, ups, downs))
        except Exception as exc:  # noqa: BLE001
            sweeps.append(dict(block_m=bm, error=short(exc), trace=traceback.format_exc(limit=3)))
    row["sweep"] = sweeps
    done = [s for s in sweeps if "total_us" in s]
    dflt = default_config(tokens)
    tuned = MoEConfig.from_dict(min(done, key=lambda s: s["total_us"])["config"]) if done else dflt
    row["config"] = tuned.to_dict()
    for name, cfg in (("tuned", tuned), ("default", dflt)):
        try:
            err = check_pipeline(x, ids, w, wt, cfg, ref)
            row[f"{name}_rel_err"] = err
            row[f"{name}_us"] = bench_us(lambda: fm.fused_experts_triton(x, ids, w, wt.w13, wt.w2, config=cfg),
                                         rep_ms=40)
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_error"] = short(exc)
    row["ok"] = row.get("tuned_rel_err", math.inf) <= TOLERANCE
    name, baseline, capturable = baseline_moe()
    row["baseline"] = name
    try:
        row["baseline_rel_err"] = rel_err(baseline(x, ids, w, wt), ref)
        fn = lambda: baseline(x, ids, w, wt)  # noqa: E731
        row["baseline_us"] = try_bench(fn) if capturable else bench_us(fn, graph=False)
    except Exception as exc:  # noqa: BLE001
        row["baseline_error"] = short(exc)
    row.update(moe_numbers(tokens, ids, row.get("tuned_us"), copy_gbps), elapsed_s=round(elapsed(), 1))
    return row


def run_moe(copy_gbps: float | None) -> list[dict]:
    wt = make_weights()
    rows = []
    for tokens in MOE_TOKENS:
        try:
            row = run_moe_tokens(tokens, wt, copy_gbps)
        except Exception as exc:  # noqa: BLE001
            row = dict(tokens=tokens, ok=False, error=short(exc), trace=traceback.format_exc(limit=4))
        print(json.dumps({k: v for k, v in row.items() if k not in ("sweep", "trace")}, default=str), flush=True)
        rows.append(row)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()  # the T=16384 buffers are ~1 GB: do not let them pile up
    return rows


def config_file(rows: list[dict]) -> dict:
    """The table fused_moe.py loads: tuned configs of the token counts that passed their check."""
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu-dry-run"
    configs = {str(r["tokens"]): r["config"] for r in rows if r.get("ok") and r.get("swept") and "config" in r}
    return dict(device=name, source="scripts/gpu_bench_kernels.py",
                shape=dict(experts=S.experts, inter=S.moe_inter, hidden=S.hidden, top_k=S.top_k + S.shared,
                           dtype=str(DTYPE)), configs=configs)


# ----------------------------------------------------------------------------- AOT (no GPU)

def aot_compile(fn, types: dict[str, str], consts: dict, opts: dict, divisible: tuple[str, ...] = ()) -> dict:
    """Compile one kernel for sm_90 (Triton ships ptxas): registers, spills, shared memory."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    attr = CUDABackend(target).parse_attr("D")
    signature = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): attr for n in fn.arg_names
             if n not in consts and (types[n].startswith("*") or n in divisible)}
    kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=opts)
    entry = dict(shared_bytes=kernel.metadata.shared)
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found:
        entry.update(registers=int(found[1]), spill_stack=int(found[2]), local=int(found[4]))
    return entry


def aot_specs() -> list[tuple[str, Any, dict, dict, dict, tuple]]:
    """(name, kernel, arg types, constexprs, launch options, divisible ints) at V2-Lite sizes."""
    bf, f32, i32, i64 = "*bf16", "*fp32", "*i32", "*i64"
    s = LITE
    specs = [
        ("rms_norm", _rms_norm_kernel, dict(x_ptr=bf, w_ptr=bf, out_ptr=bf, stride_x="i32", stride_out="i32",
                                            eps="fp32"), dict(D=s.hidden, BLOCK_D=s.hidden), dict(num_warps=4), ()),
        ("add_rms_norm", _add_rms_norm_kernel,
         dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, out_ptr=bf, stride_x="i32", stride_res="i32", stride_out="i32",
              eps="fp32"), dict(D=s.hidden, BLOCK_D=s.hidden), dict(num_warps=4), ()),
        ("silu_and_mul", _silu_and_mul_kernel, dict(x_ptr=bf, out_ptr=bf, stride_x="i32", stride_out="i32"),
         dict(I=s.dense_inter, BLOCK=1024), dict(num_warps=4), ()),
        ("topk_softmax", _topk_softmax_kernel,
         dict(logits_ptr=f32, w_ptr=f32, ids_ptr=i32, num_tokens="i32", stride_l="i32", stride_w="i32",
              stride_ids="i32", scale="fp32"),
         dict(E=64, TOP_K=6, NUM_SHARED=2, RENORMALIZE=False, E_PAD=64, OUT_PAD=8, BLOCK_T=32), dict(num_warps=4), ()),
    ]
    for splice in (False, True):
        code = s.code if splice else s.latent
        ptrs = {n: bf for n in ("latent_ptr", "kpe_ptr", "z_ptr", "qpe_ptr", "nw_ptr", "zb_ptr", "lnw_ptr", "lnb_ptr",
                                "cache_ptr", "stored_ptr")}
        ints = {n: "i32" for n in ("stride_lat", "stride_kpe", "stride_z", "stride_qt", "stride_qh", "stride_cos",
                                   "stride_sin", "stride_cb", "stride_ct", "stride_st")}
        specs.append((f"mla_write_kv splice={splice}", _mla_write_kv_kernel,
                      dict(**ptrs, **ints, pos_ptr=i64, cos_ptr=f32, sin_ptr=f32, slot_ptr=i64, eps="fp32",
                           ln_eps="fp32"),
                      dict(L=s.latent, C=code, P=s.rope, NH=s.heads, BLOCK_SIZE=s.block_size, L_PAD=s.latent,
                           C_PAD=code, HALF_PAD=s.rope // 2, BLOCK_H=16, SPLICE=splice, HAS_BIAS=splice,
                           HAS_LN=False, HAS_LN_BIAS=False), dict(num_warps=4), ()))
    specs += aot_moe_specs()
    return specs


def aot_moe_specs() -> list[tuple[str, Any, dict, dict, dict, tuple]]:
    bf, f32, i32 = "*bf16", "*fp32", "*i32"
    s = LITE
    common = dict(BLOCK_B=fm.ALIGN_BLOCK_B)
    specs = [
        ("align_small", fm._align_small_kernel,
         dict(ids_ptr=i32, sorted_ptr=i32, expert_ids_ptr=i32, num_padded_ptr=i32, num_pairs="i32", max_blocks="i32"),
         dict(E=66, E_PAD=128, BLOCK_M=16, BLOCK_P=fm.ALIGN_BLOCK_P, BLOCK_J=16, **common), dict(num_warps=4), ()),
        ("align_count", fm._align_count_kernel, dict(ids_ptr=i32, chunk_ptr=i32, num_pairs="i32"),
         dict(E=66, E_PAD=128, BLOCK_P=fm.ALIGN_BLOCK_P), dict(num_warps=4), ()),
        ("align_scan", fm._align_scan_kernel,
         dict(chunk_ptr=i32, sorted_ptr=i32, expert_ids_ptr=i32, num_padded_ptr=i32, num_pairs="i32",
              num_chunks="i32", max_blocks="i32"),
         dict(E_PAD=128, BLOCK_M=128, BLOCK_C=fm.ALIGN_BLOCK_C, BLOCK_J=16, **common), dict(num_warps=8), ()),
        ("align_scatter", fm._align_scatter_kernel,
         dict(ids_ptr=i32, chunk_ptr=i32, sorted_ptr=i32, num_pairs="i32", num_chunks="i32"),
         dict(E=66, E_PAD=128, BLOCK_P=fm.ALIGN_BLOCK_P), dict(num_warps=4), ()),
        ("moe_sum", fm._moe_sum_kernel,
         dict(y_ptr=bf, ids_ptr=i32, out_ptr=bf, num_pairs="i32", stride_y="i32", stride_out="i32"),
         dict(H=s.hidden, TOP_K=8, E=66, BLOCK_H=1024), dict(num_warps=4), ("stride_y", "stride_out")),
    ]
    gemm_types = dict(a_ptr=bf, w_ptr=bf, c_ptr=bf, topk_w_ptr=f32, sorted_ptr=i32, expert_ids_ptr=i32,
                      num_padded_ptr=i32, num_pairs="i32", max_blocks="i32", stride_a="i32", stride_we="i32",
                      stride_wn="i32", stride_c="i32")
    divisible = ("stride_a", "stride_we", "stride_wn", "stride_c")
    seen = set()
    for tokens in MOE_TOKENS:
        for bm, ups, downs in sweep_space(tokens, full=True):
            for gated, cands in ((True, ups), (False, downs)):
                for tile in cands:
                    n_out, d_in = (s.moe_inter, s.hidden) if gated else (s.hidden, s.moe_inter)
                    key = (gated, bm, tile)
                    if key in seen:
                        continue
                    seen.add(key)
                    consts = dict(N_OUT=n_out, D_IN=d_in, TOP_K=8 if gated else 1, GATED=gated, BLOCK_M=bm,
                                  BLOCK_N=fm._clip(tile.block_n, n_out), BLOCK_K=fm._clip(tile.block_k, d_in),
                                  GROUP_M=tile.group_m, DOT_FP32=False, PRECISION="tf32")
                    name = f"{'up' if gated else 'down'} bm={bm} {tile.block_n}/{tile.block_k}/{tile.group_m}"
                    specs.append((name, fm._moe_gemm_kernel, gemm_types, consts,
                                  dict(num_warps=tile.num_warps, num_stages=tile.num_stages), divisible))
    return specs


def run_aot() -> list[dict]:
    entries = []
    for name, fn, types, consts, opts, divisible in aot_specs():
        entry = dict(kernel=name, **opts)
        try:
            entry.update(aot_compile(fn, types, consts, opts, divisible))
        except Exception as exc:  # noqa: BLE001
            entry["error"] = short(exc)
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- report

def environment(copy_gbps: float | None) -> dict:
    env = dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
               device=str(DEVICE), dry_run=ARGS.dry_run, sizes=asdict(S), dtype=str(DTYPE), tolerance=TOLERANCE,
               copy_gbps=copy_gbps, peak_tflops_yardstick=PEAK_TFLOPS,
               has_grouped_mm=hasattr(torch, "_grouped_mm"))
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        env.update(gpu=props.name, sms=props.multi_processor_count)
    return env


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(small: list[dict], moe: list[dict], copy_gbps: float | None) -> None:
    print(f"\ncopy bandwidth {fmt(copy_gbps, '.0f')} GB/s; us = median microseconds from CUDA-graph replay")
    print(f"{'kernel':14} {'T':>5} {'params':22} {'ok':>3} {'rel_err':>8} {'triton':>8} {'torch':>8} "
          f"{'GB/s':>6} {'%bw':>5}")
    for r in small:
        params = ",".join(f"{k}={r[k]}" for k in ("D", "I", "E", "splice", "C") if k in r)
        print(f"{r.get('kernel', '?'):14} {r['tokens']:>5} {params:22} {'yes' if r.get('ok') else 'NO':>3} "
              f"{fmt(r.get('rel_err'), '.1e'):>8} {fmt(r.get('triton_us'), '.1f'):>8} "
              f"{fmt(r.get('torch_us'), '.1f'):>8} {fmt(r.get('gbps'), '.0f'):>6} "
              f"{fmt(r.get('pct_copy_bw'), '.0f'):>5} {r.get('error', '')}")
    print(f"\nfused MoE, E={S.experts} (incl. {S.shared} shared) I={S.moe_inter} H={S.hidden} "
          f"K={S.top_k}+{S.shared}; config = BM up(BN/BK/G/w/s) down(BN/BK/G/w/s)")
    print(f"{'T':>6} {'exp':>3} {'ok':>3} {'rel_err':>8} {'tuned':>9} {'default':>9} {'baseline':>9} {'x base':>6} "
          f"{'GB/s':>6} {'%bw':>4} {'TFLOP/s':>7}  config")
    for r in moe:
        speedup = r["baseline_us"] / r["tuned_us"] if r.get("baseline_us") and r.get("tuned_us") else None
        c = r.get("config")
        cfg = (f"{c['block_m']} {'/'.join(str(v) for v in c['up'].values())} "
               f"{'/'.join(str(v) for v in c['down'].values())}") if c else ""
        print(f"{r['tokens']:>6} {fmt(r.get('distinct_experts'), 'd'):>3} {'yes' if r.get('ok') else 'NO':>3} "
              f"{fmt(r.get('tuned_rel_err'), '.1e'):>8} {fmt(r.get('tuned_us'), '.1f'):>9} "
              f"{fmt(r.get('default_us'), '.1f'):>9} {fmt(r.get('baseline_us'), '.1f'):>9} {fmt(speedup, '.2f'):>6} "
              f"{fmt(r.get('gbps'), '.0f'):>6} {fmt(r.get('pct_copy_bw'), '.0f'):>4} {fmt(r.get('tflops'), '.0f'):>7}"
              f"  {cfg}{'' if r.get('swept', True) else ' (not swept)'} {r.get('error', '')}")


def out_paths() -> tuple[Path, Path]:
    out = ARGS.out or Path(os.environ.get("OUT") or ".") / "kernels_bench.json"
    return out, ARGS.config_out or out.parent / "fused_moe_h200.json"


def main() -> int:
    out, config_out = out_paths()
    out.parent.mkdir(parents=True, exist_ok=True)
    if ARGS.aot:
        entries = run_aot()
        out.write_text(json.dumps(dict(aot_sm90=entries), indent=1))
        bad = [e for e in entries if "error" in e or e.get("spill_stack") or e.get("shared_bytes", 0) > 227 * 1024]
        print(f"{len(entries)} compiled, {len(bad)} with errors, spills or > 227 KB shared memory; wrote {out}")
        return 1 if any("error" in e for e in entries) else 0
    torch.manual_seed(0)
    copy_gbps = measure_copy_gbps()
    print(json.dumps(dict(copy_gbps=copy_gbps)), flush=True)
    small = run_small_kernels(copy_gbps)
    moe = run_moe(copy_gbps)
    report = dict(environment=environment(copy_gbps), small_kernels=small, moe=moe, elapsed_s=round(elapsed(), 1))
    table = config_file(moe)
    report["moe_config_file"] = table
    out.write_text(json.dumps(report, indent=1, default=str))
    config_out.write_text(json.dumps(table, indent=1))
    print_tables(small, moe, copy_gbps)
    failed = [r for r in small + moe if not r.get("ok")]
    print(f"\n{len(small) + len(moe) - len(failed)} ok, {len(failed)} failed; {elapsed():.0f} s; "
          f"wrote {out} and {config_out} (copy it to server/kernels/configs/ to use it)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
