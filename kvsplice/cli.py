"""The library's subcommands of the `kvsplice` command (the server adds `serve` and `bench`)."""
from __future__ import annotations

import argparse
import json

import torch

from kvsplice.cache_size import format_breakdown, get_kv_cache_size
from kvsplice.model_source import ModelNotFound, load_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def ratio_list(text: str) -> list[float]:
    return [ratio(part) for part in text.split(",") if part.strip()]


def add_estimate(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="KV cache bytes per token and in total, by compression ratio")
    p.add_argument("--model-config", default="deepseek-v2-lite",
                   help="shipped name (deepseek-v2-lite, deepseek-v2), config.json, model dir or hub id")
    p.add_argument("--compression-ratio", type=ratio_list, default=[1.0, 0.5, 0.25],
                   help="one ratio or a comma-separated list (default 1.0,0.5,0.25)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.model_config)
    except (ModelNotFound, OSError, ValueError) as exc:
        raise SystemExit(f"kvsplice estimate: --model-config: {exc}")
    if getattr(config, "kv_lora_rank", None) is None:
        raise SystemExit(f"kvsplice estimate: --model-config: {args.model_config} is not an MLA model (no kv_lora_rank)")
    sizes = [
        get_kv_cache_size(config, args.batch_size, args.seq_len, r, DTYPES[args.dtype]) for r in args.compression_ratio
    ]
    if args.json:
        print(json.dumps([s.as_dict() for s in sizes], indent=2))
        return 0
    print(f"model config: {args.model_config}")
    for size in sizes:
        print(f"\n== compression_ratio {size.compression_ratio} ==")
        print(format_breakdown(size))
    base = sizes[0].bytes_per_token
    print("\nbytes per token: " + " / ".join(f"{s.bytes_per_token:,} (ratio {s.compression_ratio})" for s in sizes))
    print("tokens per byte vs first: " + " / ".join(f"{base / s.bytes_per_token:.2f}x" for s in sizes))
    return 0


def register_commands(subparsers) -> None:
    """Add the library's subcommands to the `kvsplice` argument parser."""
    add_estimate(subparsers)
