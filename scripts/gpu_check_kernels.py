"""Check and time the paged MLA decode kernel on a GPU, in one run (well under 3 minutes).

    python scripts/gpu_check_kernels.py                 # on the H200: checks, timings, sweeps
    python scripts/gpu_check_kernels.py --dry-run       # on a CPU: Triton interpreter, tiny sizes

For r in (512, 256, 128), P=64, H=16, block sizes 16 and 64, and (batch, context) pairs, it checks
the Triton kernel against the torch reference in bf16 (fresh random inputs, output poisoned with
NaN, rel. error <= 1e-2), times both with triton.testing.do_bench (median, L2 flushed), times the
kernel replayed from a CUDA graph, and reports the bandwidth achieved on the bytes a decode step
must read. Then, while time is left, sweeps the split count and the launch config for tuning.
Results go to one table on stdout and to $OUT/kernel_check.json (or ./kernel_check.json).
Every configuration is wrapped: a failure is reported in its row and the run goes on.
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

HEADS = 16
ROPE_DIM = 64
# V2-Lite's softmax scale: 1/sqrt(qk_nope + qk_rope) times YaRN's mscale**2 (factor 40, mscale 0.707).
SCALE = (1 / math.sqrt(192)) * (0.1 * 0.707 * math.log(40) + 1) ** 2
PEAK_GBPS = 4230.0  # H200 device-to-device copy bandwidth, as server/bench.py measures it
TOLERANCE = 1e-2

GPU_RANKS = (512, 256, 128)
GPU_BLOCK_SIZES = (16, 64)
GPU_SHAPES = ((1, 512), (16, 512), (64, 640), (256, 640), (32, 4224), (128, 4224))
DRY_RANKS = (128, 64)
DRY_BLOCK_SIZES = (16, 64)
DRY_SHAPES = ((1, 40), (3, 150))

# Split counts are a runtime argument (no recompile): swept on every shape. Launch configs
# (BLOCK_T, num_warps, num_stages) each compile anew: swept on the long-context shapes only.
# num_stages 2 vs 5 is one cache-tile buffer vs two (see triton_mla.default_launch_config).
SWEEP_SHAPES = ((1, 4224), (32, 4224), (128, 4224), (256, 640))
SWEEP_LAUNCH_SHAPES = ((32, 4224), (128, 4224))
SWEEP_SPLITS = (1, 2, 4, 8, 16, 32)
SWEEP_LAUNCH = ((16, 4, 2), (16, 4, 5), (32, 4, 2), (32, 4, 5), (32, 8, 2), (32, 8, 5), (64, 4, 5), (64, 8, 5))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=110.0, help="stop sweeping this many seconds after the start")
    parser.add_argument("--no-sweep", action="store_true", help="only the main check table")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/kernel_check.json)")
    parser.add_argument("--aot", action="store_true",
                        help="no GPU needed: compile the default configs for sm_90 and report registers/spills/smem")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from gpu_check_common import bench_ms, capture_graph, gbps, write_report  # noqa: E402
from server.kernels.mla_decode import paged_mla_decode_torch  # noqa: E402
from server.kernels.mla_decode_triton import (  # noqa: E402
    choose_num_splits,
    default_launch_config,
    paged_mla_decode_triton,
)

DEVICE = torch.device("cpu" if ARGS.dry_run or ARGS.aot else "cuda")
START = time.perf_counter()


@dataclass
class Inputs:
    q_lat: torch.Tensor
    q_pe: torch.Tensor
    kv_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    max_context_len: int

    def args(self) -> tuple:
        return (self.q_lat, self.q_pe, self.kv_cache, self.block_tables, self.context_lens, SCALE)

    def bytes_read(self) -> int:
        """What one decode call must move: the cached tokens once, the queries, the output."""
        batch, heads, r = self.q_lat.shape
        width = self.kv_cache.shape[-1]
        item = self.kv_cache.element_size()
        tokens = int(self.context_lens.sum())
        return tokens * width * item + batch * heads * (width + r) * item


@dataclass
class Row:
    r: int
    block_size: int
    batch: int
    context: int
    splits: int = 0
    rel_err: float | None = None
    ok: bool = False
    triton_ms: float | None = None
    graph_ms: float | None = None
    torch_ms: float | None = None
    gbps: float | None = None
    graph_gbps: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def make_inputs(batch: int, context: int, r: int, block_size: int, ragged: bool = False) -> Inputs:
    """Fresh random bf16 inputs; each sequence's blocks are a random, disjoint set of cache blocks."""
    gen = torch.Generator(device=DEVICE).manual_seed(batch * 7919 + context * 31 + r + block_size)
    if ragged:  # edge lengths first (padding row, one token, a block, a block + 1), then random
        edges = torch.tensor([0, 1, block_size, block_size + 1], device=DEVICE)
        lens = torch.randint(1, context + 1, (batch,), generator=gen, device=DEVICE)
        lens[: len(edges)] = edges[:batch]
    else:
        lens = torch.full((batch,), context, device=DEVICE)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE)
    # One spare column holding a valid id, as the engine's padded tables have.
    table = torch.cat([perm[: batch * blocks_per_seq].view(batch, blocks_per_seq),
                       perm[-1:].expand(batch, 1)], dim=1)
    width = r + ROPE_DIM
    return Inputs(
        q_lat=torch.randn(batch, HEADS, r, generator=gen, device=DEVICE).to(torch.bfloat16),
        q_pe=torch.randn(batch, HEADS, ROPE_DIM, generator=gen, device=DEVICE).to(torch.bfloat16),
        kv_cache=torch.randn(num_blocks, block_size, width, generator=gen, device=DEVICE).to(torch.bfloat16),
        block_tables=table.to(torch.int32).contiguous(),
        context_lens=lens.to(torch.int32),
        max_context_len=context,
    )


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def reference(inp: Inputs) -> torch.Tensor:
    # fp32 queries make the reference return fp32: the check then sees only the kernel's rounding.
    return paged_mla_decode_torch(
        inp.q_lat.float(), inp.q_pe.float(), inp.kv_cache, inp.block_tables, inp.context_lens, SCALE,
        max_context_len=inp.max_context_len,
    )


def check_output(out: torch.Tensor, want: torch.Tensor, row: Row, what: str) -> None:
    nan = out.isnan().sum().item()
    err = rel_err(out, want)
    row.rel_err = err if row.rel_err is None else max(row.rel_err, err)
    if nan or not err <= TOLERANCE:
        row.ok = False
        row.notes.append(f"{what}: {nan} NaN, rel_err {err:.2e}")


def run_config(r: int, block_size: int, batch: int, context: int) -> Row:
    row = Row(r, block_size, batch, context)
    try:
        inp = make_inputs(batch, context, r, block_size)
        row.splits = choose_num_splits(batch, context, _num_sms())
        want = reference(inp)
        out = torch.full_like(inp.q_lat, float("nan"))  # poisoned: every element must be written
        row.ok = True

        def kernel() -> None:
            paged_mla_decode_triton(*inp.args(), max_context_len=context, out=out)

        kernel()
        check_output(out, want, row, "eager")
        row.triton_ms = bench_ms(kernel, DEVICE)
        row.torch_ms = bench_ms(lambda: paged_mla_decode_torch(*inp.args(), max_context_len=context), DEVICE)
        if DEVICE.type == "cuda":
            graph = capture_graph(kernel)
            out.fill_(float("nan"))
            graph.replay()
            check_output(out, want, row, "graph")
            row.graph_ms = bench_ms(graph.replay, DEVICE)
            del graph
        nbytes = inp.bytes_read()
        row.gbps, row.graph_gbps = gbps(nbytes, row.triton_ms), gbps(nbytes, row.graph_ms)
    except Exception as exc:  # report and go on: one bad configuration must not hide the others
        row.ok = False
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc()
    return row


def run_ragged_check(r: int, block_size: int) -> Row:
    """Varied lengths incl. 0 (padding row), 1, a block, a block + 1; default and forced splits."""
    batch, context = (6, 100) if DEVICE.type != "cuda" else (37, 1000)
    row = Row(r, block_size, batch, context, splits=choose_num_splits(batch, context, _num_sms()))
    try:
        inp = make_inputs(batch, context, r, block_size, ragged=True)
        want = reference(inp)
        row.ok = True
        for splits in (None, 1, 3, 8):
            out = torch.full_like(inp.q_lat, float("nan"))
            paged_mla_decode_triton(*inp.args(), max_context_len=context, out=out, num_splits=splits)
            check_output(out, want, row, f"splits={splits}")
        zero_row = out[0].float().abs().max().item()
        if zero_row != 0.0:
            row.ok = False
            row.notes.append(f"padding row (context 0) not zero: max {zero_row}")
    except Exception as exc:
        row.ok = False
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc()
    return row


def sweep(r: int, batch: int, context: int, budget_end: float) -> list[dict]:
    """Time the kernel over split counts and launch configs (block size 16) for tuning."""
    results: list[dict] = []
    if time.perf_counter() > budget_end:
        return results
    inp = make_inputs(batch, context, r, 16)
    nbytes = inp.bytes_read()
    want = reference(inp)
    out = torch.empty_like(inp.q_lat)
    default = default_launch_config(triton.next_power_of_2(r))
    trials = [dict(num_splits=s) for s in SWEEP_SPLITS]
    heuristic = choose_num_splits(batch, context, _num_sms())
    if (batch, context) in SWEEP_LAUNCH_SHAPES or ARGS.dry_run:
        trials += [dict(num_splits=heuristic, block_t=bt, num_warps=w, num_stages=st)
                   for bt, w, st in SWEEP_LAUNCH if (bt, w, st) != default]
    for trial in trials:
        if time.perf_counter() > budget_end:
            break
        entry = dict(r=r, batch=batch, context=context, heuristic_splits=heuristic, default_launch=default, **trial)
        try:
            def kernel(trial=trial) -> None:
                paged_mla_decode_triton(*inp.args(), max_context_len=context, out=out, **trial)

            out.fill_(float("nan"))
            kernel()
            entry["rel_err"] = rel_err(out, want)
            entry["ok"] = entry["rel_err"] <= TOLERANCE and not out.isnan().any().item()
            entry["ms"] = bench_ms(kernel, DEVICE)
            entry["gbps"] = gbps(nbytes, entry["ms"])
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        results.append(entry)
    return results


def _num_sms() -> int:
    if DEVICE.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(DEVICE).multi_processor_count


def environment() -> dict:
    env = dict(torch=torch.__version__, triton=triton.__version__, device=str(DEVICE), dry_run=ARGS.dry_run,
               heads=HEADS, rope_dim=ROPE_DIM, scale=SCALE, tolerance=TOLERANCE, peak_gbps=PEAK_GBPS)
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        env.update(gpu=props.name, sms=props.multi_processor_count, capability=list(torch.cuda.get_device_capability()))
    return env


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    header = (f"{'r':>4} {'bs':>3} {'B':>4} {'ctx':>5} {'S':>3} {'ok':>4} {'rel_err':>8} {'triton':>8} "
              f"{'graph':>8} {'torch':>8} {'GB/s':>7} {'%peak':>6} {'g GB/s':>7} {'speedup':>7}  notes")
    print(header)
    print("-" * len(header))
    for row in rows:
        pct = None if row.gbps is None else 100 * row.gbps / PEAK_GBPS
        speedup = row.torch_ms / row.triton_ms if row.torch_ms and row.triton_ms else None
        notes = "; ".join(row.notes + ([row.error] if row.error else []))
        print(f"{row.r:>4} {row.block_size:>3} {row.batch:>4} {row.context:>5} {row.splits:>3} "
              f"{'yes' if row.ok else 'NO':>4} {fmt(row.rel_err, '.1e'):>8} {fmt(row.triton_ms, '.4f'):>8} "
              f"{fmt(row.graph_ms, '.4f'):>8} {fmt(row.torch_ms, '.3f'):>8} {fmt(row.gbps, '.0f'):>7} "
              f"{fmt(pct, '.1f'):>6} {fmt(row.graph_gbps, '.0f'):>7} {fmt(speedup, '.1f'):>7}  {notes}")


def print_sweep(entries: list[dict]) -> None:
    print(f"{'r':>4} {'B':>4} {'ctx':>5} {'S':>3} {'BT':>3} {'warps':>5} {'stages':>6} {'ms':>8} {'GB/s':>7}  ok/error")
    for e in entries:
        bt, warps, stages = e.get("block_t"), e.get("num_warps"), e.get("num_stages")
        d_bt, d_w, d_st = e["default_launch"]
        status = e.get("error") or ("ok" if e.get("ok") else f"BAD rel_err={e.get('rel_err')}")
        print(f"{e['r']:>4} {e['batch']:>4} {e['context']:>5} {e['num_splits']:>3} {bt or d_bt:>3} "
              f"{warps or d_w:>5} {stages or d_st:>6} {fmt(e.get('ms'), '.4f'):>8} "
              f"{fmt(e.get('gbps'), '.0f'):>7}  {status}")


def write_json(report: dict) -> Path:
    path = write_report(report, ARGS.out, "kernel_check.json", START)
    return path


def aot_report(capability: int = 90) -> list[dict]:
    """Compile the decode kernel's default configs for sm_90 on any machine (Triton ships ptxas)
    and read registers, spill stack and shared memory from the cubin: catches compile failures,
    spills and shared-memory overflows before the GPU run."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from server.kernels import mla_decode_triton as triton_mla

    target = GPUTarget("cuda", capability, 32)
    divisible = CUDABackend(target).parse_attr("D")  # what a launch marks on 16-divisible args
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    fn = triton_mla._mla_decode_kernel
    pointers = {"q_lat_ptr": "*bf16", "q_pe_ptr": "*bf16", "code_ptr": "*bf16", "rope_ptr": "*bf16",
                "scale_ptr": "*i32", "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "out_ptr": "*bf16",
                "m_part_ptr": "*fp32", "l_part_ptr": "*fp32", "acc_part_ptr": "*fp32"}
    entries = []
    for r in GPU_RANKS:
        block_t, warps, stages = default_launch_config(r)
        for block_size in GPU_BLOCK_SIZES:
            for split in (False, True):
                width = r + ROPE_DIM
                ints = dict(num_splits=3, stride_ql_b=HEADS * width, stride_ql_h=width, stride_qp_b=HEADS * width,
                            stride_qp_h=width, stride_bt_b=3, stride_o_b=HEADS * r, stride_o_h=r)
                consts = dict(stride_code_blk=block_size * width, stride_code_tok=width,
                              stride_rope_blk=block_size * width, stride_rope_tok=width, stride_scale_blk=1,
                              stride_scale_tok=1, H=HEADS, R=r, P=ROPE_DIM, H_PAD=HEADS, R_PAD=r, P_PAD=ROPE_DIM,
                              BLOCK_SIZE=block_size, BLOCK_T=block_t, SPLIT=split, FP8=False, DOT_FP32=False)
                signature = {**pointers, "qk_scale": "fp32", **{k: "i32" for k in ints},
                             **{k: "constexpr" for k in consts}}
                signature = {name: signature[name] for name in fn.arg_names}
                attrs = {(fn.arg_names.index(k),): divisible for k in pointers}
                attrs.update({(fn.arg_names.index(k),): divisible for k, v in ints.items()
                              if v % 16 == 0 and k not in fn.do_not_specialize})
                src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
                entry = dict(r=r, block_size=block_size, split=split, block_t=block_t, num_warps=warps,
                             num_stages=stages)
                try:
                    kernel = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
                    entry["shared_bytes"] = kernel.metadata.shared
                    entry["cache_tile_buffers"] = max(
                        [int(n) for n in re.findall(rf"memdesc<(\d+)x{block_t}x{r}xbf16", kernel.asm["ttgir"])] or [0])
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(kernel.asm["cubin"])
                        f.flush()
                        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                                               text=True).stdout
                    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
                    if found:
                        entry.update(registers=int(found[1]), spill_stack=int(found[2]), local=int(found[4]))
                except Exception as exc:
                    entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                print(json.dumps(entry), flush=True)
                entries.append(entry)
    return entries


def main() -> int:
    if ARGS.aot:
        entries = aot_report()
        write_json(dict(environment=environment(), aot_sm90=entries))
        return 1 if any("error" in e or e.get("spill_stack") for e in entries) else 0
    ranks, block_sizes, shapes = (DRY_RANKS, DRY_BLOCK_SIZES, DRY_SHAPES) if ARGS.dry_run else (
        GPU_RANKS, GPU_BLOCK_SIZES, GPU_SHAPES)
    report: dict = dict(environment=environment(), results=[], ragged=[], split_and_launch_sweep=[])
    print(json.dumps(report["environment"]))

    rows = []
    for r in ranks:
        for block_size in block_sizes:
            for batch, context in shapes:
                rows.append(run_config(r, block_size, batch, context))
                print(f"[{time.perf_counter() - START:6.1f}s] r={r} bs={block_size} B={batch} ctx={context} "
                      f"ok={rows[-1].ok} {rows[-1].error or ''}", flush=True)
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()  # each configuration allocates a fresh cache
    report["results"] = [asdict(row) for row in rows]
    ragged = [run_ragged_check(r, bs) for r in ranks for bs in block_sizes]
    report["ragged"] = [asdict(row) for row in ragged]
    write_json(report)

    if not ARGS.no_sweep:
        budget_end = START + ARGS.budget_s
        plan = [(r, b, c) for r in GPU_RANKS for b, c in SWEEP_SHAPES] if not ARGS.dry_run else [
            (DRY_RANKS[-1], *DRY_SHAPES[-1])]
        for r, batch, context in plan:
            try:
                report["split_and_launch_sweep"] += sweep(r, batch, context, budget_end)
            except Exception as exc:
                report["split_and_launch_sweep"].append(dict(r=r, batch=batch, context=context, error=repr(exc)))
            write_json(report)
        print("\nsweep (block size 16; '-' = not reached within --budget-s):")
        print_sweep([e for e in report["split_and_launch_sweep"] if "default_launch" in e])

    print("\nragged lengths (0, 1, block, block+1, random), splits default/1/3/8:")
    print_table(ragged)
    print(f"\npaged MLA decode, H={HEADS}, P={ROPE_DIM}, bf16; ms = median (do_bench, L2 flushed); "
          f"GB/s on cache+query+output bytes; peak {PEAK_GBPS:.0f} GB/s")
    print_table(rows)
    path = write_json(report)
    failed = [row for row in rows + ragged if not row.ok]
    print(f"\n{len(rows) + len(ragged) - len(failed)}/{len(rows) + len(ragged)} configurations ok; "
          f"{time.perf_counter() - START:.1f}s; JSON: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
