"""Check and time the Triton MoE experts (server/engine/fused_moe.py) on a GPU, in one run (< 2 min).

    python scripts/gpu_check_moe.py              # on the H200: checks, timings, 26-layer graphs, sweep
    python scripts/gpu_check_moe.py --dry-run    # on a CPU: Triton interpreter, tiny sizes
    python scripts/gpu_check_moe.py --aot        # on any machine: compile for sm_90, registers/spills/smem

DeepSeek-V2-Lite's routed experts (E=64, top-6, H=2048, I=1408, bf16, random weights). For each
token count T it checks the Triton path against the fp32 torch reference (fresh random routing,
scratch buffers poisoned with NaN, rel. error <= 1e-2, no NaN) and times, with
triton.testing.do_bench (median, L2 flushed between runs), eagerly and replayed from a CUDA graph:
the Triton path, transformers' DeepseekV2Experts with experts_implementation="grouped_mm" (the
baseline), and the reference. Bandwidth = bytes of the distinct experts the routing selected /
time, against the H200's measured 4.23 TB/s. Then: skewed routing (many tokens on few experts),
one CUDA graph of 26 layers (a decode step's routed experts, each layer its own weights and
routing), and a launch-config sweep while time is left. Eager timings at small T are mostly
Python launch overhead; the graph columns are what a captured decode step pays.
Results: a table on stdout and $OUT/moe_check.json (or ./moe_check.json). Every configuration
is wrapped: a failure is reported in its row and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--aot", action="store_true", help="compile for sm_90 without a GPU; report resources")
    parser.add_argument("--budget-s", type=float, default=85.0, help="skip optional parts after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/moe_check.json)")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from gpu_check_common import bench_ms, capture_graph, gbps, write_report  # noqa: E402
from server.engine import fused_moe  # noqa: E402
from server.engine.fused_moe import MoELaunchConfig, moe_experts_torch, moe_experts_triton  # noqa: E402

START = time.perf_counter()
PEAK_GBPS = 4230.0  # H200 copy bandwidth measured on this machine (docs/design.md)
TOLERANCE = 1e-2


@dataclass(frozen=True)
class Shape:
    experts: int
    top_k: int
    hidden: int
    inter: int
    layers: int  # for the whole-step graph

    def expert_bytes(self, item: int = 2) -> int:
        return 3 * self.inter * self.hidden * item  # gate + up + down


LITE = Shape(experts=64, top_k=6, hidden=2048, inter=1408, layers=26)
TINY = Shape(experts=8, top_k=2, hidden=64, inter=48, layers=2)
if ARGS.dry_run:
    SHAPE, DEVICE = TINY, torch.device("cpu")
    TOKENS, EXTRA_TOKENS, LAYER_TOKENS = (1, 2, 4), (), (2,)
else:
    SHAPE, DEVICE = LITE, torch.device("cuda")
    # 128/256 are past the default threshold (64): they show where the crossover lies.
    TOKENS, EXTRA_TOKENS, LAYER_TOKENS = (1, 2, 4, 8, 16, 32, 64), (128, 256), (1, 4, 16, 64)
DTYPE = torch.bfloat16

# The sweep: launch configs, each compiled anew; timed from CUDA graphs at these token counts.
SWEEP_TOKENS = (1, 8, 64) if not ARGS.dry_run else (1,)
SWEEP = [
    MoELaunchConfig(),
    MoELaunchConfig(gate_up_block_h=128, down_block_n=16),
    MoELaunchConfig(gate_up_block_h=512, gate_up_stages=3, down_block_k=256, down_stages=3),
    MoELaunchConfig(gate_up_block_n=32, gate_up_block_h=128, down_block_n=64, down_block_k=64),
    MoELaunchConfig(gate_up_warps=8, down_warps=8),
    MoELaunchConfig(gate_up_stages=2, down_stages=2),
    MoELaunchConfig(gate_up_stages=6, down_block_n=16, down_block_k=256, down_stages=5),
    MoELaunchConfig(gate_up_block_h=128, gate_up_warps=2, down_block_n=16, down_block_k=128, down_warps=2),
]
if ARGS.dry_run:
    SWEEP = SWEEP[:2]


# ----------------------------------------------------------------------------- inputs

@dataclass
class Layer:
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]


def make_layer(seed: int) -> Layer:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    s = SHAPE
    # Scaled so activations stay O(1): the relative error then measures rounding, not overflow.
    gate_up = torch.randn(s.experts, 2 * s.inter, s.hidden, generator=gen, device=DEVICE, dtype=DTYPE)
    down = torch.randn(s.experts, s.hidden, s.inter, generator=gen, device=DEVICE, dtype=DTYPE)
    return Layer(gate_up.mul_(s.hidden ** -0.5), down.mul_(s.inter ** -0.5))


def make_routing(tokens: int, seed: int, skew: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], idx [T, K] (distinct experts per token, as top-k gives), w [T, K] fp32.
    skew > 0 routes every token to experts drawn from only the first `skew` ones."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    pool = skew or SHAPE.experts
    scores = torch.rand(tokens, pool, generator=gen, device=DEVICE)
    idx = scores.topk(SHAPE.top_k, dim=-1).indices
    w = torch.rand(tokens, SHAPE.top_k, generator=gen, device=DEVICE) + 0.1
    x = torch.randn(tokens, SHAPE.hidden, generator=gen, device=DEVICE, dtype=DTYPE)
    return x, idx, w


def distinct_bytes(idx: torch.Tensor) -> int:
    return int(idx.unique().numel()) * SHAPE.expert_bytes(2)


def hf_experts(layer: Layer, implementation: str = "grouped_mm") -> torch.nn.Module:
    """transformers' DeepseekV2Experts on the layer's weights (shared, not copied)."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

    config = DeepseekV2Config(
        hidden_size=SHAPE.hidden, moe_intermediate_size=SHAPE.inter, n_routed_experts=SHAPE.experts,
        num_experts_per_tok=SHAPE.top_k, hidden_act="silu", experts_implementation=implementation,
    )
    with torch.device("meta"):  # no allocation for the placeholder parameters
        module = DeepseekV2Experts(config)
    module.gate_up_proj = torch.nn.Parameter(layer.gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(layer.down, requires_grad=False)
    return module


# ----------------------------------------------------------------------------- timing

def graph_ms(fn) -> float | None:
    if DEVICE.type != "cuda":
        return None
    graph = capture_graph(fn)
    try:
        return bench_ms(graph.replay, DEVICE)
    finally:
        del graph


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:240]


def timed(row: "Row", name: str, fn) -> float | None:
    """Run one measurement; a failure goes into the row's notes instead of ending the run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and go on
        row.notes.append(f"{name}: {short(exc)}")
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return None


# ----------------------------------------------------------------------------- checks

def poisoned_triton(x, idx, w, layer: Layer, config: MoELaunchConfig | None = None) -> torch.Tensor:
    """The Triton path with torch.empty filling NaN (floats) / max int: a scratch element read
    before it is written shows up as NaN or as a wild index."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        return moe_experts_triton(x, idx, w, layer.gate_up, layer.down, config=config)
    finally:
        torch.use_deterministic_algorithms(False)


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int]:
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
    return err, int(got.isnan().sum().item())


@dataclass
class Row:
    tokens: int
    routing: str
    distinct_experts: int = 0
    mbytes: float = 0.0  # distinct experts' weights
    ideal_us: float = 0.0  # mbytes at PEAK_GBPS
    ok: bool = False
    rel_err: float | None = None
    triton_us: float | None = None
    triton_graph_us: float | None = None
    grouped_mm_us: float | None = None
    grouped_mm_graph_us: float | None = None
    reference_us: float | None = None
    reference_graph_us: float | None = None
    graph_gbps: float | None = None
    pct_peak: float | None = None
    notes: list[str] = field(default_factory=list)


def run_row(layer: Layer, baseline: torch.nn.Module, tokens: int, routing: str, seed: int) -> Row:
    row = Row(tokens, routing)
    try:
        skew = SHAPE.top_k if routing == "all-same" else (2 * SHAPE.top_k if routing == "skewed" else 0)
        x, idx, w = make_routing(tokens, seed, skew=skew)
        row.distinct_experts = int(idx.unique().numel())
        nbytes = distinct_bytes(idx)
        row.mbytes, row.ideal_us = nbytes / 1e6, nbytes / (PEAK_GBPS * 1e9) * 1e6

        want = moe_experts_torch(x, idx, w, layer.gate_up, layer.down)
        row.rel_err, nans = compare(poisoned_triton(x, idx, w, layer), want)
        row.ok = nans == 0 and row.rel_err <= TOLERANCE
        if not row.ok:
            row.notes.append(f"{nans} NaN, rel_err {row.rel_err:.2e}")
        base_out = timed(row, "grouped_mm", lambda: baseline(x, idx, w))
        if base_out is not None:
            row.notes.append(f"grouped_mm vs reference rel_err {compare(base_out, want)[0]:.1e}")

        def us(fn):
            def run() -> float | None:
                ms = fn()
                return None if ms is None else 1e3 * ms  # graphs: None on the CPU
            return run

        triton_fn = lambda: moe_experts_triton(x, idx, w, layer.gate_up, layer.down)  # noqa: E731
        base_fn = lambda: baseline(x, idx, w)  # noqa: E731
        ref_fn = lambda: moe_experts_torch(x, idx, w, layer.gate_up, layer.down)  # noqa: E731
        row.triton_us = timed(row, "triton", us(lambda: bench_ms(triton_fn, DEVICE)))
        row.triton_graph_us = timed(row, "triton graph", us(lambda: graph_ms(triton_fn)))
        row.grouped_mm_us = timed(row, "grouped_mm time", us(lambda: bench_ms(base_fn, DEVICE)))
        row.grouped_mm_graph_us = timed(row, "grouped_mm graph", us(lambda: graph_ms(base_fn)))
        row.reference_us = timed(row, "reference", us(lambda: bench_ms(ref_fn, DEVICE)))
        row.reference_graph_us = timed(row, "reference graph", us(lambda: graph_ms(ref_fn)))
        best = row.triton_graph_us or row.triton_us
        row.graph_gbps = gbps(nbytes, best and best / 1e3)
        row.pct_peak = row.graph_gbps and 100 * row.graph_gbps / PEAK_GBPS
    except Exception as exc:  # noqa: BLE001
        row.ok = False
        row.notes.append(short(exc))
        traceback.print_exc()
    return row


def run_step_graph(layers: list[Layer], tokens: int) -> dict:
    """One CUDA graph over all layers (each its own weights and routing), as in a decode step."""
    entry: dict = dict(tokens=tokens, layers=len(layers))
    try:
        inputs = [make_routing(tokens, seed=1000 * tokens + i) for i in range(len(layers))]
        nbytes = sum(distinct_bytes(idx) for _, idx, _ in inputs)
        entry["mbytes"] = nbytes / 1e6
        entry["ideal_us"] = nbytes / (PEAK_GBPS * 1e9) * 1e6
        baselines = [hf_experts(layer) for layer in layers]

        def run_triton():
            for layer, (x, idx, w) in zip(layers, inputs):
                moe_experts_triton(x, idx, w, layer.gate_up, layer.down)

        def run_baseline():
            for module, (x, idx, w) in zip(baselines, inputs):
                module(x, idx, w)

        for name, fn in (("triton", run_triton), ("grouped_mm", run_baseline)):
            try:
                ms = graph_ms(fn) if DEVICE.type == "cuda" else bench_ms(fn, DEVICE)  # dry run: eager
                entry[f"{name}_graph_us"] = 1e3 * ms
                entry[f"{name}_gbps"] = gbps(nbytes, ms)
            except Exception as exc:  # noqa: BLE001
                entry[f"{name}_error"] = short(exc)
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        entry["error"] = short(exc)
    return entry


def run_sweep(layer: Layer, deadline: float) -> list[dict]:
    entries = []
    routings = {t: make_routing(t, seed=500 + t) for t in SWEEP_TOKENS}
    for i, cfg in enumerate(SWEEP):
        for tokens, (x, idx, w) in routings.items():
            if time.perf_counter() > deadline:
                entries.append(dict(config=i, skipped="time budget"))
                return entries
            entry = dict(config=i, tokens=tokens, **asdict(cfg))
            try:
                want = moe_experts_torch(x, idx, w, layer.gate_up, layer.down)
                err, nans = compare(poisoned_triton(x, idx, w, layer, cfg), want)
                entry.update(rel_err=err, ok=nans == 0 and err <= TOLERANCE)
                fn = lambda: moe_experts_triton(x, idx, w, layer.gate_up, layer.down, config=cfg)  # noqa: E731
                ms = graph_ms(fn) if DEVICE.type == "cuda" else bench_ms(fn, DEVICE)
                entry.update(graph_us=1e3 * ms, gbps=gbps(distinct_bytes(idx), ms))
            except Exception as exc:  # noqa: BLE001
                entry["error"] = short(exc)
            entries.append(entry)
            print(json.dumps(entry), flush=True)
    return entries


# ----------------------------------------------------------------------------- AOT (no GPU)

def aot_report(capability: int = 90) -> list[dict]:
    """Compile the four kernels at V2-Lite sizes for sm_90 (Triton ships ptxas), for every sweep
    config; read registers, spill stack and shared memory. Catches compile errors and spills
    before the GPU run."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    divisible = CUDABackend(target).parse_attr("D")
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    s = LITE
    ptr = {"i64": "*i64", "i32": "*i32", "bf16": "*bf16", "fp32": "*fp32"}

    def kernel_specs(cfg: MoELaunchConfig) -> list[tuple[str, object, dict, dict, dict]]:
        i32 = {n: ptr["i32"] for n in ("sorted_pair_ptr", "slot_expert_ptr", "slot_start_ptr", "slot_count_ptr")}
        bn1 = fused_moe._tile(cfg.gate_up_block_n, s.inter)
        bn2 = fused_moe._tile(cfg.down_block_n, s.hidden)
        return [
            ("route", fused_moe._route_kernel, {"topk_idx_ptr": ptr["i64"], **i32},
             dict(num_pairs=384, num_slots=64), dict(E=s.experts, E_PAD=s.experts, BLOCK_P=fused_moe.ROUTE_BLOCK_P)),
            ("gate_up", fused_moe._gate_up_kernel,
             {"x_ptr": ptr["bf16"], "w_ptr": ptr["bf16"], "act_ptr": ptr["bf16"], **i32},
             dict(stride_x=s.hidden, stride_we=2 * s.inter * s.hidden, stride_wr=s.hidden, stride_act=s.inter),
             dict(H=s.hidden, I=s.inter, K=s.top_k, BLOCK_M=cfg.block_m, BLOCK_N=bn1,
                  BLOCK_H=fused_moe._tile(cfg.gate_up_block_h, s.hidden), DOT_FP32=False, PRECISION="tf32")),
            ("down", fused_moe._down_kernel,
             {"act_ptr": ptr["bf16"], "w_ptr": ptr["bf16"], "topk_w_ptr": ptr["fp32"], "ybuf_ptr": ptr["fp32"], **i32},
             dict(stride_act=s.inter, stride_we=s.hidden * s.inter, stride_wr=s.inter, stride_y=s.hidden),
             dict(H=s.hidden, I=s.inter, BLOCK_M=cfg.block_m, BLOCK_N=bn2,
                  BLOCK_K=fused_moe._tile(cfg.down_block_k, s.inter), DOT_FP32=False, PRECISION="tf32")),
            ("sum_k", fused_moe._sum_k_kernel,
             {"ybuf_ptr": ptr["fp32"], "topk_idx_ptr": ptr["i64"], "out_ptr": ptr["bf16"]},
             dict(stride_y=s.hidden, stride_out=s.hidden), dict(H=s.hidden, K=s.top_k, E=s.experts, BLOCK_H=1024)),
        ]

    def launch_options(name: str, cfg: MoELaunchConfig) -> dict:
        if name == "gate_up":
            return dict(num_warps=cfg.gate_up_warps, num_stages=cfg.gate_up_stages)
        if name == "down":
            return dict(num_warps=cfg.down_warps, num_stages=cfg.down_stages)
        return dict(num_warps=4, num_stages=3)

    entries = []
    for i, cfg in enumerate(SWEEP):
        for name, fn, pointers, ints, consts in kernel_specs(cfg):
            if i > 0 and name in ("route", "sum_k"):
                continue  # these do not depend on the config
            opts = launch_options(name, cfg)
            entry = dict(config=i, kernel=name, **opts)
            try:
                signature = {**pointers, **{k: "i32" for k in ints}, **{k: "constexpr" for k in consts}}
                signature = {n: signature[n] for n in fn.arg_names}
                attrs = {(fn.arg_names.index(k),): divisible for k in pointers}
                attrs.update({(fn.arg_names.index(k),): divisible for k, v in ints.items() if v % 16 == 0})
                src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
                kernel = triton.compile(src, target=target, options=opts)
                entry["shared_bytes"] = kernel.metadata.shared
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                                           text=True).stdout
                found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
                if found:
                    entry.update(registers=int(found[1]), spill_stack=int(found[2]), local=int(found[4]))
            except Exception as exc:  # noqa: BLE001
                entry["error"] = short(exc)
            print(json.dumps(entry), flush=True)
            entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- report

def environment() -> dict:
    import transformers

    env = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
               device=str(DEVICE), dry_run=ARGS.dry_run, shape=asdict(SHAPE), dtype=str(DTYPE),
               tolerance=TOLERANCE, peak_gbps=PEAK_GBPS, default_config=asdict(MoELaunchConfig()),
               default_max_tokens=fused_moe.DEFAULT_MAX_TOKENS)
    if DEVICE.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(DEVICE)
        env.update(gpu=props.name, sms=props.multi_processor_count)
    return env


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_rows(rows: list[Row]) -> None:
    print("\nus = microseconds, median; 'graph' = replayed from a CUDA graph; GB/s from the Triton graph time")
    header = (f"{'T':>4} {'routing':>8} {'exp':>3} {'MB':>6} {'ideal':>6} {'ok':>3} {'rel_err':>7} "
              f"{'triton':>7} {'tr.gr':>7} {'gmm':>7} {'gmm.gr':>7} {'ref':>7} {'ref.gr':>7} "
              f"{'GB/s':>6} {'%peak':>5} {'x gmm':>5}  notes")
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = r.grouped_mm_graph_us / r.triton_graph_us if r.grouped_mm_graph_us and r.triton_graph_us else None
        print(f"{r.tokens:>4} {r.routing:>8} {r.distinct_experts:>3} {r.mbytes:>6.1f} {r.ideal_us:>6.1f} "
              f"{'yes' if r.ok else 'NO':>3} {fmt(r.rel_err, '.1e'):>7} {fmt(r.triton_us, '.1f'):>7} "
              f"{fmt(r.triton_graph_us, '.1f'):>7} {fmt(r.grouped_mm_us, '.1f'):>7} "
              f"{fmt(r.grouped_mm_graph_us, '.1f'):>7} {fmt(r.reference_us, '.1f'):>7} "
              f"{fmt(r.reference_graph_us, '.1f'):>7} {fmt(r.graph_gbps, '.0f'):>6} {fmt(r.pct_peak, '.1f'):>5} "
              f"{fmt(speedup, '.1f'):>5}  {'; '.join(r.notes)}")


def print_steps(entries: list[dict]) -> None:
    print("\nwhole decode step, routed experts only, one CUDA graph over all layers (us)")
    print(f"{'T':>4} {'layers':>6} {'MB':>8} {'ideal':>7} {'triton':>8} {'GB/s':>6} {'grouped_mm':>10} {'GB/s':>6}  errors")
    for e in entries:
        errors = "; ".join(str(e[k]) for k in ("error", "triton_error", "grouped_mm_error") if k in e)
        print(f"{e['tokens']:>4} {e['layers']:>6} {fmt(e.get('mbytes'), '.0f'):>8} {fmt(e.get('ideal_us'), '.0f'):>7} "
              f"{fmt(e.get('triton_graph_us'), '.0f'):>8} {fmt(e.get('triton_gbps'), '.0f'):>6} "
              f"{fmt(e.get('grouped_mm_graph_us'), '.0f'):>10} {fmt(e.get('grouped_mm_gbps'), '.0f'):>6}  {errors}")


def print_sweep(entries: list[dict]) -> None:
    print("\nlaunch-config sweep (graph us / GB/s); configs in the JSON")
    for e in entries:
        if "skipped" in e:
            print(f"config {e['config']}: skipped ({e['skipped']})")
            continue
        status = e.get("error") or ("ok" if e.get("ok") else f"BAD rel_err={e.get('rel_err')}")
        print(f"config {e['config']} T={e['tokens']:>3}: {fmt(e.get('graph_us'), '8.1f')} us "
              f"{fmt(e.get('gbps'), '6.0f')} GB/s  {status}")


def write_json(report: dict) -> Path:
    path = write_report(report, ARGS.out, "moe_check.json", START)
    print(f"\nwrote {path} ({report['elapsed_s']} s)")
    return path


def main() -> int:
    report: dict = dict(environment=environment())
    print(json.dumps(report["environment"]), flush=True)
    if ARGS.aot:
        report["aot_sm90"] = aot_report()
        write_json(report)
        return 1 if any("error" in e or e.get("spill_stack") for e in report["aot_sm90"]) else 0

    deadline = START + ARGS.budget_s
    layer = make_layer(seed=0)
    baseline = hf_experts(layer)
    report["baseline"] = f"DeepseekV2Experts, experts_implementation={baseline.config._experts_implementation}"

    rows: list[Row] = []
    plan = [(t, "random") for t in TOKENS] + [(t, "random") for t in EXTRA_TOKENS]
    plan += [(TOKENS[-1], "skewed"), (TOKENS[-1], "all-same")]
    for i, (tokens, routing) in enumerate(plan):
        rows.append(run_row(layer, baseline, tokens, routing, seed=i))
        print(f"[{time.perf_counter() - START:6.1f}s] T={tokens} {routing}: ok={rows[-1].ok} "
              f"{'; '.join(rows[-1].notes)}", flush=True)
    report["rows"] = [asdict(r) for r in rows]
    print_rows(rows)
    write_json(report)  # the main table is safe on disk before the optional parts

    steps: list[dict] = []
    report["step_graphs"] = steps
    if LAYER_TOKENS and time.perf_counter() < deadline - 30:
        try:
            layers = [layer] + [make_layer(seed=i) for i in range(1, SHAPE.layers)]
            for tokens in LAYER_TOKENS:
                if time.perf_counter() > deadline - 20:
                    steps.append(dict(tokens=tokens, layers=SHAPE.layers, error="skipped: time budget"))
                    continue
                steps.append(run_step_graph(layers, tokens))
                print(json.dumps(steps[-1]), flush=True)
            del layers
        except Exception as exc:  # noqa: BLE001 (e.g. out of memory for 26 layers of weights)
            steps.append(dict(tokens=-1, layers=SHAPE.layers, error=short(exc)))
        torch.cuda.empty_cache()
        print_steps(steps)
        write_json(report)

    report["sweep"] = run_sweep(layer, deadline)
    print_sweep(report["sweep"])
    write_json(report)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
