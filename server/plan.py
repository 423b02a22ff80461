"""`kvsplice plan`: what each GPU holds when a model is split over several, before renting them.

For every tensor x pipeline split, compression ratio and cache dtype: the weights on the fullest
GPU (counted from the serving model's own shard shapes, server/parallel/capacity.py), its KV bytes
per token, and, for each GPU size, the KV budget left under `gpu_memory_utilization` (less the
weights and the activation estimate the server reserves) and the tokens it holds. Arithmetic, not
a measurement: the server logs what it really allocates at start-up.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass

import torch

from kvsplice.cache_layout import CacheLayout
from kvsplice.cli import kv_dtype_list, ratio_list
from kvsplice.model_source import ModelNotFound, load_config
from server.engine.config import EngineConfig
from server.engine.kv_budget import activation_bytes
from server.engine.placement import split_layers
from server.parallel.capacity import GpuShare, gpu_share
from server.parallel.shards import check_shardable


@dataclass
class PlanRow:
    share: GpuShare
    compression_ratio: float
    kv_cache_dtype: str
    gpu_gib: float
    kv_budget_bytes: int  # per GPU; negative: the weights do not fit

    @property
    def tokens(self) -> int:
        return self.share.tokens(self.kv_budget_bytes)

    def as_dict(self) -> dict:
        return {**self.share.as_dict(), "compression_ratio": self.compression_ratio,
                "kv_cache_dtype": self.kv_cache_dtype, "gpu_gib": self.gpu_gib,
                "kv_budget_bytes": self.kv_budget_bytes, "kv_capacity_tokens": self.tokens}


def plan(args: argparse.Namespace) -> tuple[list[PlanRow], list[str]]:
    """The rows, and one line for each split the model cannot take."""
    config = load_config(args.model_config)
    reserve = activation_bytes(config, EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                                    max_num_seqs=args.max_num_seqs))
    rows, refused = [], []
    for tp, pp in itertools.product(args.tensor_parallel_size, args.pipeline_parallel_size):
        try:
            check_shardable(config, tp, args.enable_expert_parallel)
            split_layers(config.num_hidden_layers, list(range(pp)))
        except ValueError as exc:
            refused.append(f"tp {tp} x pp {pp}: {exc}")
            continue
        for kv_dtype, ratio in itertools.product(args.kv_cache_dtype, args.compression_ratio):
            layout = CacheLayout.for_ratio(config, ratio, torch.bfloat16, kv_cache_dtype=kv_dtype)
            share = gpu_share(config, layout, tp, pp, args.enable_expert_parallel)
            for gib in args.gpu_memory_gib:
                budget = int(args.gpu_memory_utilization * gib * 2**30) - share.weight_bytes - reserve
                rows.append(PlanRow(share, ratio, kv_dtype, gib, budget))
    return rows, refused


def table(rows: list[PlanRow]) -> str:
    lines = ["| GPUs | tp x pp | ratio | cache | weights / GPU | KV B / token / GPU | GPU | KV budget / GPU | tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.share
        split = f"{'ep' if s.expert_parallel else 'tp'} {s.tensor_parallel_size} x pp {s.pipeline_parallel_size}"
        fits = r.kv_budget_bytes > s.kv_bytes_per_token
        lines.append(f"| {s.num_gpus} | {split} | {r.compression_ratio:g} | {r.kv_cache_dtype} | "
                     f"{s.weight_bytes / 1e9:.1f} GB | {s.kv_bytes_per_token:,} | {r.gpu_gib:g} GiB | "
                     + (f"{r.kv_budget_bytes / 1e9:.1f} GB | {r.tokens:,} |" if fits else "does not fit | - |"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        rows, refused = plan(args)
    except (ModelNotFound, OSError) as exc:
        raise SystemExit(f"kvsplice plan: --model-config: {exc}")
    if args.json:
        print(json.dumps({"rows": [r.as_dict() for r in rows], "refused": refused}, indent=2))
        return 0
    print(f"model config: {args.model_config}; gpu_memory_utilization {args.gpu_memory_utilization:g}; an activation "
          f"reserve for max_num_batched_tokens {args.max_num_batched_tokens} (an estimate, unsharded)")
    print("Tensor-parallel ranks each keep the whole latent of their layers; pipeline stages split the layers.\n")
    print(table(rows))
    for line in refused:
        print(f"\nnot possible: {line}")
    return 0


def register(subparsers) -> None:
    def int_list(text: str) -> list[int]:
        values = [int(v) for v in text.split(",")]
        if any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text}")
        return values

    def gib_list(text: str) -> list[float]:
        values = [float(v) for v in text.split(",")]
        if any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"GPU memory must be > 0 GiB, got {text}")
        return values

    def utilization(text: str) -> float:
        value = float(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
        return value

    p = subparsers.add_parser("plan", help="weights, KV bytes per token and KV capacity per GPU for a split")
    p.add_argument("--model-config", default="deepseek-v2",
                   help="shipped name (deepseek-v2, deepseek-v2-lite), config.json, model dir or hub id")
    p.add_argument("--tensor-parallel-size", type=int_list, default=[1, 2, 4, 8], help="comma list (default 1,2,4,8)")
    p.add_argument("--pipeline-parallel-size", type=int_list, default=[1], help="comma list (default 1)")
    p.add_argument("--enable-expert-parallel", action="store_true", help="whole routed experts per rank")
    p.add_argument("--compression-ratio", type=ratio_list, default=[1.0, 0.5], help="comma list (default 1.0,0.5)")
    p.add_argument("--kv-cache-dtype", type=kv_dtype_list, default=["auto"], help="comma list: auto, fp8 (default auto)")
    p.add_argument("--gpu-memory-gib", type=gib_list, default=[80.0],
                   help="GPU memory sizes in GiB, comma list (default 80; an H200 reports 139.8)")
    p.add_argument("--gpu-memory-utilization", type=utilization, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
