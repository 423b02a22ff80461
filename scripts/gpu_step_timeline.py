"""Where an engine run's time goes, step by step, with and without async scheduling.

Runs one batch (random prompts, greedy, ignore_eos) through the engine twice per mode (warm-up,
then timed) and records each step: wall time, host time in schedule / launch / collect, and how
many prefill and decode tokens it carried. Prints a summary per phase and writes JSON.

    python scripts/gpu_step_timeline.py --shape deepseek-v2-lite --prompt-len 512 --new 128 --batch 256 --out t.json
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict

import torch

from server.bench import random_prompts
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams


def timed(record: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[key] = record.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def run_once(engine: LLMEngine, prompts: list[list[int]], new: int) -> list[dict]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"t{i}", p, params)
    core, steps = engine.core, []
    schedule, launch, collect = core.scheduler.schedule, core.runner.launch, core.runner.collect
    t0 = time.perf_counter()
    while engine.has_unfinished():
        record: dict = {}

        def counting_launch(plan, record=record):
            record["prefill_tokens"] = sum(len(w.token_ids) for w in plan.work if len(w.token_ids) > 1)
            record["decode_tokens"] = sum(1 for w in plan.work if len(w.token_ids) == 1)
            return launch(plan)

        core.scheduler.schedule = timed(record, "schedule_s", schedule)
        core.runner.launch = timed(record, "launch_s", counting_launch)
        core.runner.collect = timed(record, "collect_s", collect)
        start = time.perf_counter()
        record["first_tokens"] = sum(1 for out in engine.step() if len(out.token_ids) == 1)
        record["wall_s"] = time.perf_counter() - start
        record["t_s"] = time.perf_counter() - t0
        steps.append(record)
    core.scheduler.schedule, core.runner.launch, core.runner.collect = schedule, launch, collect
    return steps


def summarize(name: str, steps: list[dict]) -> dict:
    phases: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for s in steps:
        phase = "prefill" if s.get("prefill_tokens") else "decode" if s.get("decode_tokens") else "drain"
        p = phases[phase]
        p["steps"] += 1
        for key in ("wall_s", "schedule_s", "launch_s", "collect_s", "prefill_tokens", "decode_tokens"):
            p[key] += s.get(key, 0.0)
    last_first = max((s["t_s"] for s in steps if s["first_tokens"]), default=float("nan"))
    print(f"\n{name}: {len(steps)} steps, {steps[-1]['t_s']:.3f} s, last first token at {last_first:.3f} s")
    print("| phase | steps | wall s | per step ms | schedule ms | launch ms | collect ms | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for phase, p in phases.items():
        n = p["steps"]
        rate = p["prefill_tokens"] / p["wall_s"] if p["prefill_tokens"] else 0
        print(f"| {phase} | {n:.0f} | {p['wall_s']:.3f} | {1e3 * p['wall_s'] / n:.2f} | {1e3 * p['schedule_s'] / n:.2f} "
              f"| {1e3 * p['launch_s'] / n:.2f} | {1e3 * p['collect_s'] / n:.2f} | {rate:,.0f} |")
    return {"total_s": steps[-1]["t_s"], "last_first_token_s": last_first, "phases": phases, "steps": steps}


ORDER = (True, False)


def profile_prefill(engine: LLMEngine, prompts: list[list[int]], steps: int, out: str | None) -> None:
    """torch.profiler over the first `steps` steps of a batch (prefill chunks): by device time, and
    by host time (a host sync inside the forward shows up as cudaStreamSynchronize / a DtoH copy)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    table = prof.key_averages()
    text = (f"prefill profile: {steps} steps of up to {engine.config.max_num_batched_tokens} tokens\n"
            + table.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40)
            + "\nby host time\n" + table.table(sort_by="self_cpu_time_total", row_limit=25))
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="deepseek-v2-lite", help="a shipped config with random weights, or builtin")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--ratio", type=float, default=1.0)
    p.add_argument("--profile-prefill-steps", type=int, default=0, help="also profile this many prefill steps")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = {"args": vars(args)}
    for asynchronous in ORDER:
        engine = LLMEngine(EngineConfig(
            model=args.shape, load_format="auto" if args.shape == "builtin" else "dummy", compression_ratio=args.ratio, max_num_seqs=args.batch,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.prompt_len + args.new + 16,
            kv_cache_memory_fraction=0.3, async_scheduling=asynchronous,
            enable_prefix_caching=False))  # the timed run repeats the warm-up's prompts
        prompts = random_prompts(engine.hf_config.vocab_size, args.batch, args.prompt_len, seed=0)
        run_once(engine, prompts, args.new)  # warm-up: kernels compiled, allocator and pinned pool settled
        name = "async" if asynchronous else "sync"
        result[name] = summarize(name, run_once(engine, prompts, args.new))
        if asynchronous and args.profile_prefill_steps:
            profile_prefill(engine, prompts, args.profile_prefill_steps,
                            args.out and args.out.replace(".json", "_prefill_profile.txt"))
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
