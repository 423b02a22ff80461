"""The library's subcommands of the `kvsplice` command (the server adds `serve` and `bench`).

`estimate` sizes the cache, `calibrate` builds splices for a model, `eval` measures perplexity with
and without them. Argument parsing only: the work happens in cache_size, calibrate_job and eval_job.
`python -m kvsplice.cli COMMAND ...` runs them without the server's dependencies.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kvsplice.cache_size import format_breakdown, get_kv_cache_size
from kvsplice.kv_quant import KV_CACHE_DTYPES
from kvsplice.model_source import ModelNotFound, load_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def checked_number(convert, valid, rule: str):
    """An argparse type: parse with `convert`, refuse values `valid` rejects (argparse names the flag)."""

    def parse(text: str):
        value = convert(text)
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value

    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'" for unparsable text
    return parse


positive_int = checked_number(int, lambda value: value >= 1, "must be >= 1")


ratio = checked_number(float, lambda value: 0.0 < value <= 1.0, "must be in (0, 1]")


def ratio_list(text: str) -> list[float]:
    return [ratio(part) for part in text.split(",") if part.strip()]


def kv_dtype_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in KV_CACHE_DTYPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(KV_CACHE_DTYPES)}, got {text!r}")
    return list(dict.fromkeys(names))


def add_estimate(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="KV cache bytes per token and in total, by compression ratio")
    p.add_argument("--model-config", default="deepseek-v2-lite",
                   help="shipped name (deepseek-v2-lite, deepseek-v2), config.json, model dir or hub id")
    p.add_argument("--compression-ratio", type=ratio_list, default=[1.0, 0.5, 0.25],
                   help="one ratio or a comma-separated list (default 1.0,0.5,0.25)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--kv-cache-dtype", type=kv_dtype_list, default=["auto"],
                   help="cache storage, one or a comma list: auto/bf16 (the --dtype), fp8 (= fp8_e4m3), fp8_e5m2; "
                        "every ratio is shown with every one (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.model_config)
    except (ModelNotFound, OSError, ValueError) as exc:
        raise SystemExit(f"kvsplice estimate: --model-config: {exc}")
    if getattr(config, "kv_lora_rank", None) is None:
        raise SystemExit(f"kvsplice estimate: --model-config: {args.model_config} is not an MLA model (no kv_lora_rank)")
    sizes = [get_kv_cache_size(config, args.batch_size, args.seq_len, r, DTYPES[args.dtype], kv)
             for kv in args.kv_cache_dtype for r in args.compression_ratio]
    if args.json:
        print(json.dumps([s.as_dict() for s in sizes], indent=2))
        return 0
    print(f"model config: {args.model_config}")
    print(format_breakdown(sizes))
    def label(s) -> str:
        return f"ratio {s.compression_ratio}" + (f", {s.kv_cache_dtype}" if s.kv_cache_dtype != "auto" else "")
    print("\nbytes per token: " + " / ".join(f"{s.bytes_per_token:,} ({label(s)})" for s in sizes))
    return 0


# ----------------------------------------------------------------------------- calibrate and eval

INITS = ("truncate", "orthogonal", "pca")


nonnegative_int = checked_number(int, lambda value: value >= 0, "must be >= 0")


positive_float = checked_number(float, lambda value: value > 0, "must be > 0")


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def init_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in INITS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown initialisation {', '.join(bad) or text!r}; choose from {', '.join(INITS)}")
    return names


def _add_model_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--model", default="builtin", help="model dir, 'builtin' or a hub id (default builtin)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights dtype for the run (default float32: exact comparisons, and what fine-tuning needs)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"windows per forward (default {batch_size})")
    p.add_argument("--seed", type=int, default=0)


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        parser.error(f"argument --device: {exc}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {device} requested but CUDA is not available")


def _with_parser(parser: argparse.ArgumentParser, run: Callable) -> Callable:
    """Bind the subparser so checks that need several flags can report through parser.error."""
    return lambda args: run(parser, args)


def _command_line() -> str:
    return shlex.join(["kvsplice" if sys.argv[0].endswith(("kvsplice", "cli.py")) else Path(sys.argv[0]).name,
                       *sys.argv[1:]])


def add_calibrate(subparsers) -> None:
    from kvsplice.calibrate_job import DEFAULT_CALIB_FILE

    p = subparsers.add_parser(
        "calibrate", help="fit per-layer splices for a model on calibration text (PCA, optionally fine-tuned)",
        description="Fit one splice per layer on calibration text and save them as one safetensors file. "
                    "--finetune then trains only the splices (base frozen) to match the unpatched model's "
                    "next-token distribution, keeping the best parameters on held-out windows.")
    _add_model_args(p, batch_size=4)
    p.add_argument("--compression-ratio", type=ratio, default=0.5, help="fraction of the latent kept (default 0.5)")
    p.add_argument("--init", choices=INITS, default="pca", help="initialisation (default pca)")
    p.add_argument("--data", default=str(DEFAULT_CALIB_FILE), help="calibration text file (default: shipped calib.txt)")
    p.add_argument("--max-tokens", type=positive_int, default=65536,
                   help="calibration tokens used, in windows spread over the text (default 65536: all of calib.txt)")
    p.add_argument("--window", type=positive_int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--heldout-frac", type=fraction, default=0.2,
                   help="share of windows held out to measure (and, when fine-tuning, to select) the splices")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--finetune", action="store_true", help="distil the unpatched model into the splices")
    p.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps (default 200)")
    p.add_argument("--lr", type=positive_float, default=None, help="fine-tuning learning rate (default 3e-4)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="held-out evaluation interval (default 25)")
    p.add_argument("--json", action="store_true", help="also print the calibration info as JSON")
    p.set_defaults(func=_with_parser(p, run_calibrate_cli))


def run_calibrate_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from kvsplice.calibrate_job import run_calibrate

    _check_device(parser, args.device)
    if not Path(args.data).is_file():
        parser.error(f"argument --data: calibration text not found: {args.data}")
    if args.window < 2:
        parser.error("argument --window: must be >= 2")
    tuning = {"--steps": args.steps, "--lr": args.lr, "--eval-every": args.eval_every}
    if not args.finetune and any(v is not None for v in tuning.values()):
        given = next(flag for flag, v in tuning.items() if v is not None)
        parser.error(f"argument {given}: only used with --finetune")
    if args.finetune and args.dtype != "float32":
        parser.error("argument --dtype: --finetune trains the splices in the model's dtype and needs float32")
    if args.finetune and args.heldout_frac == 0:
        parser.error("argument --heldout-frac: --finetune selects its result on held-out windows; use > 0")
    args.steps, args.lr, args.eval_every = args.steps or 200, args.lr or 3e-4, args.eval_every or 25
    args.command_line = _command_line()
    return run_calibrate(args)


def add_eval(subparsers) -> None:
    from kvsplice.calibrate_job import DEFAULT_CALIB_FILE

    p = subparsers.add_parser(
        "eval", help="perplexity of the original and the spliced model on the same sliding windows",
        description="Perplexity (exp of the mean token NLL, strided sliding windows, each window scoring only "
                    "its new tokens) of the unpatched model and of spliced versions at one or more ratios; "
                    "prints the table, and with --out also writes perplexity.json, perplexity.md and "
                    "perplexity.png there.")
    _add_model_args(p, batch_size=4)
    p.add_argument("--compression-ratio", dest="ratios", type=ratio_list, action="append", default=None,
                   help="ratio(s): repeat the flag or give a comma list (default 0.5); 1.0 = no splice")
    p.add_argument("--init", dest="inits", type=init_list, action="append", default=None,
                   help="initialisation(s) evaluated at every ratio: repeat or comma list "
                        "(default truncate,pca; none when only --splices is given)")
    p.add_argument("--splices", nargs="+", action="extend", default=[], metavar="FILE",
                   help="splice files from `kvsplice calibrate` (each at its own ratio)")
    p.add_argument("--kv-cache-dtype", type=kv_dtype_list, default=["auto"],
                   help="cache storage(s) every variant is evaluated with, comma list: auto (the model dtype, "
                        "unrounded), bf16 (rounded to bfloat16, as served), fp8 (= fp8_e4m3), fp8_e5m2 "
                        "(default auto); 'bf16,fp8' gives the matched-bytes table")
    p.add_argument("--dataset", default="corpus",
                   help="wikitext (hub; offline it falls over to --text-file or the shipped held-out text), "
                        "corpus (the shipped held-out text, default) or a text file path")
    p.add_argument("--text-file", default=None, help="text used when --dataset wikitext is unavailable")
    p.add_argument("--samples", type=nonnegative_int, default=0, help="evaluate only the first N windows (0: all)")
    p.add_argument("--window", type=positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=positive_int, default=256, help="new tokens scored per window (default 256)")
    p.add_argument("--calib-file", default=str(DEFAULT_CALIB_FILE), help="calibration text for --init pca")
    p.add_argument("--calib-tokens", type=positive_int, default=65536,
                   help="calibration tokens for pca, spread over the file (default 65536: all of calib.txt)")
    p.add_argument("--out", default=None,
                   help="directory for perplexity.json, .md and .png (default: print the table only)")
    p.set_defaults(func=_with_parser(p, run_eval_cli))


def run_eval_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from kvsplice.eval_job import run_eval

    _check_device(parser, args.device)
    if args.window < 2:
        parser.error("argument --window: must be >= 2")
    if args.stride > args.window:
        parser.error(f"argument --stride: must be <= --window ({args.window}), got {args.stride}")
    for path in args.splices:
        if not Path(path).is_file():
            parser.error(f"argument --splices: file not found: {path}")
    if args.text_file is not None and not Path(args.text_file).is_file():
        parser.error(f"argument --text-file: file not found: {args.text_file}")
    if args.dataset not in ("wikitext", "corpus") and not Path(args.dataset).is_file():
        parser.error(f"argument --dataset: expected wikitext, corpus or an existing text file, got {args.dataset!r}")
    args.ratios = sorted({r for group in (args.ratios or [[0.5]]) for r in group}, reverse=True)
    default_inits = [] if args.splices else ["truncate", "pca"]
    args.inits = list(dict.fromkeys(i for group in args.inits for i in group)) if args.inits else default_inits
    if "pca" in args.inits and not Path(args.calib_file).is_file():
        parser.error(f"argument --calib-file: calibration text not found: {args.calib_file}")
    args.command_line = _command_line()
    return run_eval(args)


def register_commands(subparsers) -> None:
    """Add the library's subcommands to the `kvsplice` argument parser."""
    add_estimate(subparsers)
    add_calibrate(subparsers)
    add_eval(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """The library's commands on their own (`python -m kvsplice.cli eval ...`)."""
    parser = argparse.ArgumentParser(prog="kvsplice", description=__doc__.splitlines()[0])
    register_commands(parser.add_subparsers(title="commands", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
