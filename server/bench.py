"""`kvsplice bench`: transformers `generate` and the engine at several compression ratios (and cache
storages: --kv-cache-dtypes auto,fp8), side by side in one process on the same weights and
workloads. Prints one table and writes JSON.

On the CPU it runs the built-in model; on a GPU `--shape deepseek-v2-lite` builds that shape with
random bf16 weights (speed and memory do not depend on the weight values).

`--tensor-parallel-size N` runs the engine over N ranks (one GPU each). With `--one-rank` it runs
only rank 0's shard, alone, its collectives replaced by no-ops: what one GPU of an N-GPU group
computes and holds, without the communication, on a machine with one GPU. Its outputs are not
the model's (nothing is summed): a measurement of compute and memory only.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvsplice.cache_size import get_kv_cache_size
from kvsplice.cli import kv_dtype_list, positive_int, ratio_list
from kvsplice.model_source import load_config, load_pretrained
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_runner import resolve_device
from server.engine.sampling_params import SamplingParams
from server.parallel.workers import Workers


@dataclass
class Workload:
    prompt_len: int
    new_tokens: int
    batch_sizes: list[int]

    @classmethod
    def parse(cls, text: str) -> "Workload":
        """'PROMPT:NEW:B1,B2,...', e.g. '512:128:1,16,64'."""
        try:
            prompt, new, batches = text.split(":")
            return cls(int(prompt), int(new), [int(b) for b in batches.split(",")])
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected PROMPT:NEW:B1,B2,... (e.g. 512:128:1,16), got {text!r}")


@dataclass
class Row:
    system: str  # "transformers", "engine@<ratio>" or "engine@<ratio>,<kv_cache_dtype>" (not auto)
    prompt_len: int
    new_tokens: int
    batch: int
    seconds: float
    output_tok_s: float
    ttft_s: float
    peak_mem_gib: float | None
    kv_bytes_per_token: int | None
    extra: dict = field(default_factory=dict)


def build_transformers_model(args, device: torch.device, dtype: torch.dtype):
    """transformers' model for the baseline rows: the checkpoint, or the shipped shape with seeded
    random weights (other values than the engine's random weights: speed does not depend on them)."""
    if args.shape is None:
        return load_pretrained(args.model, dtype, str(device))[0]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = {"experts_implementation": "grouped_mm"} if device.type == "cuda" else {}
    with device:
        return AutoModelForCausalLM.from_config(load_config(args.shape), dtype=dtype, **kwargs).eval()


def random_prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, length), generator=gen).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.inference_mode()
def run_transformers(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(seconds for the whole generate, seconds to the first token) with greedy decoding."""
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    sync(device)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync(device)
    return time.perf_counter() - t0, ttft


def run_engine(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, float, float]:
    """(seconds until every request finished, mean time to first token, median seconds of the steps
    in which every request was decoding, prompt tokens per second until the last first token)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.time()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params)
    first: dict[str, float] = {}
    decode_steps: list[float] = []
    scheduler = engine.core.scheduler
    while engine.has_unfinished():
        all_decoding = not scheduler.waiting and all(s.num_uncomputed_tokens == 1 for s in scheduler.running)
        start = time.perf_counter()
        for out in engine.step():
            if out.finish_reason == "error":
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            first.setdefault(out.request_id, out.times.first_token)
        if all_decoding and len(scheduler.running) == len(prompts):
            decode_steps.append(time.perf_counter() - start)
    seconds = time.time() - t0
    decode_step = sorted(decode_steps)[len(decode_steps) // 2] if decode_steps else float("nan")
    prefill_tok_s = sum(map(len, prompts)) / (max(first.values()) - t0)
    return seconds, sum(first.values()) / len(first) - t0, decode_step, prefill_tok_s


def decode_bytes_per_step(config, batch: int, context: int, ratio: float, dtype_bytes: int = 2,
                          kv_cache_dtype: str = "auto") -> float:
    """The fewest bytes one decode step must read: every attention and dense weight, the shared
    experts, the routed experts a uniform router is expected to hit at this batch, lm_head, and the
    batch's cached tokens (this is the memory-bandwidth floor of a decode step)."""
    h, heads = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    q = h * heads * qk if config.q_lora_rank is None else config.q_lora_rank * (h + heads * qk)
    attention = (q + h * (config.kv_lora_rank + config.qk_rope_head_dim)
                 + config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
                 + heads * config.v_head_dim * h)
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    expert = 3 * h * config.moe_intermediate_size
    hit = experts * (1 - (1 - top_k / experts) ** batch)
    dense = config.first_k_dense_replace
    params = (config.num_hidden_layers * attention + dense * 3 * h * config.intermediate_size
              + (config.num_hidden_layers - dense) * ((hit + config.n_shared_experts) * expert + experts * h)
              + config.vocab_size * h)
    kv = batch * context * get_kv_cache_size(config, compression_ratio=ratio, kv_cache_dtype=kv_cache_dtype).bytes_per_token
    return params * dtype_bytes + kv


def copy_bandwidth(device: torch.device) -> float | None:
    """Device memory bandwidth in bytes/s, measured as a large device-to-device copy (read + write)."""
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize(device)
    return 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)


def bench(args) -> list[Row]:
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = load_config(args.shape or args.model)
    vocab = config.vocab_size
    rows: list[Row] = []
    bandwidth = copy_bandwidth(device)
    if bandwidth:
        print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
    if not args.skip_transformers:
        rows += bench_transformers(args, device, dtype, vocab)
    progress = tqdm(total=len(engine_systems(args)) * sum(len(w.batch_sizes) for w in args.workload),
                    desc="engine rows", unit="row")
    for kv_cache_dtype, ratio in engine_systems(args):
        workers = Workers.alone(args.tensor_parallel_size) if args.one_rank else None
        engine = LLMEngine(engine_config(args, device, ratio, kv_cache_dtype), workers=workers)
        for w in args.workload:
            for b in w.batch_sizes:
                rows.append(bench_engine_row(engine, w, b, ratio, config, bandwidth, args.trials, vocab,
                                             parallel_name(args)))
                print_row(rows[-1])
                progress.update()
        for batch in args.profile_batch or []:
            name = system_name(ratio, kv_cache_dtype).replace("engine@", "").replace(",", "_")
            profile_decode(engine, vocab, batch, args.workload[0].prompt_len, device,
                           args.out and Path(args.out).with_name(f"profile_engine_{name}_batch{batch}.txt"))
        engine.shutdown()
        del engine
        free_memory(device)
    progress.close()
    return rows


def engine_systems(args) -> list[tuple[str, float]]:
    """(kv_cache_dtype, ratio) of every engine measured, in table order."""
    return [(kv, ratio) for kv in args.kv_cache_dtypes for ratio in args.ratios]


def system_name(ratio: float, kv_cache_dtype: str = "auto", parallel: str = "") -> str:
    return f"engine@{ratio}" + ("" if kv_cache_dtype == "auto" else f",{kv_cache_dtype}") + parallel


def parallel_name(args) -> str:
    """How the engine is split, for the row names: '', ',tp8', ',ep8', ',tp8 rank0 alone'."""
    if args.tensor_parallel_size == 1 and args.pipeline_parallel_size == 1:
        return ""
    name = f",{'ep' if args.enable_expert_parallel else 'tp'}{args.tensor_parallel_size}"
    name += f"xpp{args.pipeline_parallel_size}" if args.pipeline_parallel_size > 1 else ""
    return name + (" rank0 alone" if args.one_rank else "")


def engine_config(args, device: torch.device, ratio: float, kv_cache_dtype: str = "auto") -> EngineConfig:
    max_batch = max(b for w in args.workload for b in w.batch_sizes)
    max_len = max(w.prompt_len + w.new_tokens for w in args.workload) + 16  # room for the profile run
    return EngineConfig(
        model=args.shape or args.model, load_format="dummy" if args.shape else "auto", device=str(device),
        compression_ratio=ratio, kv_cache_bytes=args.kv_cache_bytes,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction, max_num_seqs=max_batch,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len, block_size=args.block_size,
        pipeline_parallel_size=args.pipeline_parallel_size, tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel, gpu_memory_utilization=args.gpu_memory_utilization,
        fused_moe=not args.no_fused_moe,
        async_scheduling=not args.no_async_scheduling, kv_cache_dtype=kv_cache_dtype,
        enable_prefix_caching=False,  # trials repeat their prompts: timed runs would read the cache
    )


def bench_transformers(args, device: torch.device, dtype: torch.dtype, vocab: int) -> list[Row]:
    model = build_transformers_model(args, device, dtype)
    rows = []
    for w in args.workload:
        for b in w.batch_sizes:
            if b > args.transformers_max_batch:
                continue
            prompts = random_prompts(vocab, b, w.prompt_len, seed=b)
            run_transformers(model, prompts[:1], 2, device)  # warm-up
            reset_peak(device)
            seconds, ttft = run_transformers(model, prompts, w.new_tokens, device)
            rows.append(Row("transformers", w.prompt_len, w.new_tokens, b, seconds, b * w.new_tokens / seconds,
                            ttft, peak_gib(device), None))
            print_row(rows[-1])
    del model
    free_memory(device)
    return rows


def bench_engine_row(engine: LLMEngine, w: Workload, batch: int, ratio: float, config, bandwidth: float | None,
                     trials: int, vocab: int, parallel: str = "") -> Row:
    """One (workload, batch) row: a warm-up run of the same shapes (kernel compiles, allocator),
    then `trials` timed runs; every figure is the median over the trials."""
    prompts = random_prompts(vocab, batch, w.prompt_len, seed=batch)
    run_engine(engine, prompts, min(w.new_tokens, 4))
    runs = []
    for _ in range(trials):
        reset_peak(engine.core.runner.device)
        runs.append(run_engine(engine, prompts, w.new_tokens))
    seconds, ttft, step_s, prefill_tok_s = (statistics.median(r[i] for r in runs) for i in range(4))
    stats = engine.stats()
    floor_s = (decode_bytes_per_step(config, batch, w.prompt_len + w.new_tokens // 2, ratio,
                                     kv_cache_dtype=stats.kv_cache_dtype) / bandwidth
               if bandwidth else float("nan"))
    return Row(system_name(ratio, stats.kv_cache_dtype, parallel), w.prompt_len, w.new_tokens, batch, seconds,
               batch * w.new_tokens / seconds, ttft, peak_gib(engine.core.runner.device), stats.kv_bytes_per_token,
               {"kv_capacity_tokens": stats.kv_capacity_tokens, "preemptions": stats.num_preemptions_total,
                "weight_gib": engine.core.runner.weight_bytes / 2**30,
                "decode_step_ms": step_s * 1e3, "decode_floor_ms": floor_s * 1e3,
                "bandwidth_fraction": floor_s / step_s, "prefill_tok_s": prefill_tok_s, "trials": trials,
                "tok_s_spread": [batch * w.new_tokens / r[0] for r in runs]})


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_decode(engine: LLMEngine, vocab: int, batch: int, prompt_len: int, device: torch.device,
                   out_path: Path | None, steps: int = 8) -> None:
    """Where a decode step's time goes: torch.profiler over `steps` steps once every request is
    decoding; the table (by device time) is printed and saved next to the JSON."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(random_prompts(vocab, batch, prompt_len, seed=99)):
        engine.add_request(f"profile-{i}", p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.core.seqs.values()):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    while engine.has_unfinished():
        engine.step()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages()
    text = (f"decode profile: batch {batch}, {steps} steps\n" + table.table(sort_by=sort, row_limit=30)
            + "\nby host time (where a step's CPU goes while the GPU may wait)\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=20))
    print(text)
    if out_path:
        out_path.write_text(text)


def print_row(row: Row) -> None:
    step = row.extra.get("decode_step_ms")
    tqdm.write(f"  {row.system:<14} prompt {row.prompt_len:>5} new {row.new_tokens:>4} batch {row.batch:>4}: "
          f"{row.output_tok_s:>9.1f} tok/s  ttft {row.ttft_s:.3f}s"
          + (f"  decode step {step:.2f} ms" if step is not None else ""))


def step_cell(row: Row | None) -> str:
    """'12.34 (50%)': decode step ms and the bandwidth-floor fraction (no fraction on the CPU)."""
    if row is None:
        return "-"
    fraction = row.extra["bandwidth_fraction"]
    return f"{row.extra['decode_step_ms']:.2f}" + ("" if math.isnan(fraction) else f" ({100 * fraction:.0f}%)")


def tok_s_cell(row: Row | None) -> str:
    """Output tok/s: the median, and the spread over the trials when there were several."""
    if row is None:
        return "-"
    spread = row.extra.get("tok_s_spread") or []
    return f"{row.output_tok_s:.1f}" + (f" ({min(spread):.0f}-{max(spread):.0f})" if len(spread) > 1 else "")


def table(rows: list[Row], engines: list[str]) -> str:
    """One line per workload and batch: each system's tok/s, the engine/transformers and engine/first-engine ratios."""
    systems = ["transformers"] + engines
    keyed = {(r.system, r.prompt_len, r.new_tokens, r.batch): r for r in rows}
    shapes = sorted({(r.prompt_len, r.new_tokens, r.batch) for r in rows})
    head = ["prompt", "new", "batch"] + [f"{s} tok/s" for s in systems] + [f"{s} ttft s" for s in systems[1:]]
    head += ["KV B/token " + s for s in systems[1:]]
    head += [f"{s} decode step ms (% of BW floor)" for s in systems[1:]]
    head += [f"{s} prefill tok/s" for s in systems[1:]]
    base = engines[0]
    comparisons = [(f"{e}/transformers", e, "transformers") for e in engines]
    comparisons += [(f"{e}/{base}", e, base) for e in engines[1:]]
    head += [name for name, _, _ in comparisons]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in shapes:
        get = lambda s: keyed.get((s, *shape))  # noqa: E731
        cells = [str(v) for v in shape]
        cells += [tok_s_cell(get(s)) for s in systems]
        cells += [f"{get(s).ttft_s:.3f}" if get(s) else "-" for s in systems[1:]]
        cells += [f"{get(s).kv_bytes_per_token:,}" if get(s) else "-" for s in systems[1:]]
        cells += [step_cell(get(s)) for s in systems[1:]]
        cells += [f"{get(s).extra['prefill_tok_s']:,.0f}" if get(s) else "-" for s in systems[1:]]
        cells += [f"{get(a).output_tok_s / get(b).output_tok_s:.2f}x" if get(a) and get(b) else "-"
                  for _, a, b in comparisons]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "cpu_count": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def run(args: argparse.Namespace) -> int:
    if args.shape is not None and args.model != "builtin":
        raise SystemExit("kvsplice bench: give --model or --shape, not both")
    if args.one_rank and args.tensor_parallel_size == 1:
        raise SystemExit("kvsplice bench: --one-rank needs --tensor-parallel-size > 1")
    if args.batch_sizes:  # the original guide's interface: --batch-sizes with --seq-len (and --new-tokens)
        args.workload = [*(args.workload or []), Workload(args.seq_len, args.new_tokens, args.batch_sizes)]
    args.workload = args.workload or [Workload(64, 32, [1, 8, 32])]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = bench(args)
    device = resolve_device(args.device)
    argv = sys.argv[1:]
    engines = [system_name(ratio, kv, parallel_name(args)) for kv, ratio in engine_systems(args)]
    result = {"command": "kvsplice bench " + " ".join(argv[1:] if argv[:1] == ["bench"] else argv),
              "environment": environment(device), "ratios": args.ratios, "kv_cache_dtypes": args.kv_cache_dtypes,
              "parallel": {"tensor_parallel_size": args.tensor_parallel_size,
                           "pipeline_parallel_size": args.pipeline_parallel_size,
                           "enable_expert_parallel": args.enable_expert_parallel, "one_rank": args.one_rank},
              "rows": [asdict(r) for r in rows]}
    print("\n" + table(rows, engines))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="transformers generate vs the engine at several ratios, one process")
    p.add_argument("--model", default="builtin", help="model path or hub id (default: the built-in model)")
    p.add_argument("--shape", default=None, help="a shipped config (deepseek-v2-lite) built with random weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--workload", type=Workload.parse, action="append",
                   help="PROMPT:NEW:B1,B2,... (repeatable; default 64:32:1,8,32)")
    p.add_argument("--ratios", "--compression-ratio", dest="ratios", type=ratio_list, default=[1.0, 0.5],
                   help="engine compression ratios, comma list (1.0 first; --compression-ratio is the original "
                        "guide's name)")
    p.add_argument("--kv-cache-dtypes", type=kv_dtype_list, default=["auto"],
                   help="cache storages, comma list (auto, fp8, fp8_e5m2): every ratio with every one (default auto)")
    p.add_argument("--kv-cache-bytes", type=positive_int, default=None)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.5)
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=8192)
    p.add_argument("--block-size", type=positive_int, default=16)
    p.add_argument("--pipeline-parallel-size", type=positive_int, default=1, help="GPUs to split the layers over")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="ranks (GPUs) to shard the model over")
    p.add_argument("--enable-expert-parallel", action="store_true", help="whole routed experts per rank")
    p.add_argument("--one-rank", action="store_true",
                   help="with --tensor-parallel-size N: run rank 0's shard alone, collectives as no-ops (one GPU's "
                        "compute and memory in an N-GPU group, without communication)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of the GPU for weights + activations + KV (wins over the fraction)")
    p.add_argument("--no-fused-moe", action="store_true", help="engine uses transformers' experts at every batch")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="engine collects each step before scheduling the next (the before of async scheduling)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-max-batch", type=positive_int, default=1 << 30,
                   help="skip transformers rows above this batch (its generate is slow at large batch)")
    p.add_argument("--profile-batch", type=lambda text: [positive_int(b) for b in text.split(",")], default=None,
                   help="after the rows, profile decode steps at these batch sizes (e.g. 1,256) for each ratio")
    p.add_argument("--batch-sizes", type=lambda text: [positive_int(b) for b in text.split(",")], default=None,
                   help="with --seq-len and --new-tokens: one workload at these batch sizes (e.g. 1,4,8,16)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="prompt tokens for --batch-sizes (default 512)")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="generated tokens for --batch-sizes (default 128)")
    p.add_argument("--trials", type=positive_int, default=1,
                   help="timed runs per row (after a warm-up): medians, and the tok/s spread (min-max) in the table")
    p.add_argument("--out", default=None, help="write JSON here")
    p.set_defaults(func=run, workload=None)



def main(argv: list[str] | None = None) -> int:
    """`python -m server.bench ...`: the same as `kvsplice bench`, without the server's dependencies
    (the GPU machine has torch and transformers but not FastAPI)."""
    parser = argparse.ArgumentParser(prog="kvsplice")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
