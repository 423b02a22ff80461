"""The offline perplexity job behind `kvsplice eval`: the original model against spliced versions.

One run evaluates the unpatched model once and then every (initialisation, ratio) pair and every
splice file on the same strided windows of the same text, prints the perplexity table, and
writes perplexity.json, perplexity.md and perplexity.png to the output directory when one is
given. Ratio 1.0 means no splice (plain MLA) and is evaluated like the others, as a check that it
reproduces the original exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvsplice.cache_size import get_kv_cache_size
from kvsplice.calibrate_job import build_splices, calibration_windows
from kvsplice.patch import patch_model_with_kvsplice, unpatch_model
from kvsplice.perplexity import PerplexityResult, encode_text, perplexity, sliding_windows
from kvsplice.splice import rank_for_ratio
from kvsplice.storage import load_splices, read_splice_metadata

DEFAULT_TEST_FILE = Path(__file__).parent / "data" / "corpus" / "test.txt"
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
HUB_PROBE_URL = "https://huggingface.co/api/datasets/Salesforce/wikitext"
HUB_PROBE_TIMEOUT_S = 3.0


# ------------------------------------------------------------------------------------ the text


@dataclass(frozen=True)
class EvalText:
    text: str
    source: str  # what was used, for the report
    note: str = ""  # why, when it is not what was asked for


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One short request (proxy settings honoured): the hub libraries retry for a long time when
    there is no network, so the job asks once, quickly, before letting them try."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        urllib.request.urlopen(HUB_PROBE_URL, timeout=timeout).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable now"
        return False


@contextmanager
def hub_offline():
    """Offline mode for the duration, also for libraries that read the variables at import time."""
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_hub = hub_constants.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as ds_config
    except ImportError:
        ds_config = None
    saved_ds = getattr(ds_config, "HF_HUB_OFFLINE", None)
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hub_constants.HF_HUB_OFFLINE = saved_hub
        if ds_config is not None:
            ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = saved_ds


def load_wikitext() -> str:
    """wikitext-2-raw-v1 test, joined the usual way ("\\n\\n".join of its rows); offline (no network
    or HF_HUB_OFFLINE=1) only a cached copy can load, and a missing one fails at once."""
    from datasets import load_dataset

    name, config, split = WIKITEXT
    if hub_reachable():
        rows = load_dataset(name, config, split=split)["text"]
    else:
        with hub_offline():
            rows = load_dataset(name, config, split=split)["text"]
    return "\n\n".join(rows)


def load_eval_text(dataset: str, text_file: str | None = None) -> EvalText:
    """`wikitext` (falling over to text_file or the shipped held-out text), `corpus` (the shipped
    held-out text) or a path to a UTF-8 text file."""
    if dataset == "wikitext":
        try:
            return EvalText(load_wikitext(), "wikitext-2-raw-v1 test (datasets)")
        except (OSError, ConnectionError, ValueError, ImportError) as exc:
            fallback = Path(text_file) if text_file else DEFAULT_TEST_FILE
            note = (f"wikitext-2 is not available ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                    f"using {fallback} instead")
            print(note, file=sys.stderr, flush=True)
            return EvalText(_read(fallback), str(fallback), note)
    path = DEFAULT_TEST_FILE if dataset == "corpus" else Path(dataset)
    return EvalText(_read(path), str(path))


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text not found: {path}")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------- the variants


@dataclass(frozen=True)
class Variant:
    """One spliced model to evaluate: an initialisation at a ratio, or a splice file."""

    label: str  # line in the plot: init name, or the file's init / name
    ratio: float
    init: str | None = None
    splices_file: str | None = None


NO_SPLICE = "no splice"


def plan_variants(ratios: list[float], inits: list[str], splice_files: list[str]) -> list[Variant]:
    """Every init at every ratio below 1.0, plus ratio 1.0 once (no splice, whatever the init)."""
    variants = [Variant(NO_SPLICE, 1.0)] if inits and 1.0 in ratios else []
    variants += [Variant(init, r, init=init) for init in inits for r in ratios if r < 1.0]
    files = [(str(path), read_splice_metadata(path)) for path in splice_files]
    # A file is labelled by its init ("learned", ...), so files at several ratios form one line; the
    # file name is added only where two would share a label and a ratio.
    keys = [(meta["init"], float(meta["compression_ratio"])) for _, meta in files]
    taken = {(v.label, v.ratio) for v in variants}
    for (path, meta), key in zip(files, keys):
        clash = keys.count(key) > 1 or key in taken
        label = f"{meta['init']} ({Path(path).name})" if clash else meta["init"]
        variants.append(Variant(label, key[1], splices_file=path))
    return variants


def splices_for(model: nn.Module, variant: Variant, calib: torch.Tensor | None, batch_size: int):
    """The splices of a variant, or None for "no splice" (ratio 1.0 with an initialisation)."""
    if variant.splices_file:
        return load_splices(variant.splices_file, model)
    if variant.init is None:
        return None  # KVSplice defines ratio 1.0 as plain MLA: nothing to patch
    return build_splices(model, variant.ratio, variant.init, calib, batch_size)


def evaluate_variant(model, ids, windows, variant, calib, batch_size) -> PerplexityResult:
    splices = splices_for(model, variant, calib, batch_size)
    patch_model_with_kvsplice(model, variant.ratio, splices=splices)
    try:
        return perplexity(model, ids, windows, batch_size, desc=f"{variant.label} @ {variant.ratio}")
    finally:
        unpatch_model(model)


def evaluate_all(model, ids, windows, variants, calib, batch_size) -> tuple[PerplexityResult, list[dict]]:
    """The original model, then every variant, on the same windows."""
    original = perplexity(model, ids, windows, batch_size, desc="original")
    rows = []
    for variant in variants:
        result = evaluate_variant(model, ids, windows, variant, calib, batch_size)
        rows.append(_row(model.config, variant, result, original))
        print(f"  {variant.label:<28} ratio {variant.ratio:<5} ppl {result.perplexity:10.4f}  "
              f"({rows[-1]['degradation_pct']:+.2f}%)", flush=True)
    return original, rows


# ------------------------------------------------------------------------------------------ the job


def run_eval(args: argparse.Namespace) -> int:
    """`kvsplice eval`: evaluate and print the table; with --out, also write JSON, Markdown and PNG."""
    from kvsplice.model_source import load_pretrained

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    text = load_eval_text(args.dataset, args.text_file)
    ids = encode_text(tokenizer, text.text)
    windows = sliding_windows(len(ids), args.window, args.stride, args.samples or None)
    variants = plan_variants(args.ratios, args.inits, args.splices)
    calib = None
    if any(v.init == "pca" and v.ratio < 1.0 for v in variants):
        calib_path = Path(args.calib_file)
        calib = calibration_windows(tokenizer, calib_path.read_text(encoding="utf-8"), args.window,
                                    args.calib_tokens, heldout_frac=0.0, source=str(calib_path))
    print(f"{args.model}: {len(windows)} windows of {args.window} tokens, stride {args.stride}, "
          f"{sum(w.scored for w in windows):,} scored tokens of {text.source}", flush=True)

    original, rows = evaluate_all(model, ids, windows, variants, calib.fit if calib else None, args.batch_size)
    report = {
        "model": args.model,
        "text": {"source": text.source, "note": text.note, "tokens": len(ids)},
        "window": args.window,
        "stride": args.stride,
        "windows": len(windows),
        "samples": args.samples,
        "scored_tokens": original.tokens,
        "method": "exp(mean next-token NLL); strided sliding windows, each scoring only its new tokens",
        "calibration": calib.describe() if calib else None,
        "original": original.as_dict(),
        "results": rows,
        "command": getattr(args, "command_line", ""),
        "device": args.device,
        "dtype": args.dtype,
        "versions": _versions(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print("\n" + markdown(report), flush=True)
    if args.out:
        write_report(report, Path(args.out))
        print(f"wrote {args.out}/perplexity.{{json,md,png}}")
    return 0


def _row(config, variant: Variant, result: PerplexityResult, original: PerplexityResult) -> dict:
    rank = rank_for_ratio(config.kv_lora_rank, variant.ratio)
    return {
        "label": variant.label, "init": variant.init, "splices_file": variant.splices_file,
        "compression_ratio": variant.ratio, "rank": rank,
        "kv_bytes_per_token_bf16": get_kv_cache_size(config, compression_ratio=variant.ratio).bytes_per_token,
        "perplexity": result.perplexity, "mean_nll": result.mean_nll, "tokens": result.tokens,
        "degradation_pct": 100.0 * (result.perplexity / original.perplexity - 1.0),
    }


def _versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------- outputs


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "perplexity.md").write_text(markdown(report))
    try:
        plot(report, out / "perplexity.png")
    except ImportError as exc:  # matplotlib is optional where only the numbers are needed
        print(f"no perplexity.png: {exc}", file=sys.stderr)


def markdown(report: dict) -> str:
    o = report["original"]
    lines = [
        f"# Perplexity: {report['model']}",
        "",
        f"Text: {report['text']['source']} ({report['scored_tokens']:,} scored tokens, {report['windows']} windows of "
        f"{report['window']} tokens, stride {report['stride']}). {report['text']['note']}".rstrip(),
        "",
        f"Original (no splice): perplexity **{o['perplexity']:.4f}** (mean NLL {o['mean_nll']:.5f}).",
        "",
        "| splices | ratio | rank | KV bytes/token (bf16) | perplexity | vs original |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['label']} | {r['compression_ratio']} | {r['rank']} | {r['kv_bytes_per_token_bf16']:,} | "
                     f"{r['perplexity']:.4f} | {r['degradation_pct']:+.2f}% |")
    lines += ["", *pivot_table(report)]
    lines += ["", f"Command: `{report['command']}`" if report["command"] else "",
              f"Device {report['device']}, {report['dtype']}, " +
              ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def pivot_table(report: dict) -> list[str]:
    """Perplexity by splices (rows) and ratio (columns); ratio 1.0 is the original for every row."""
    ratios = sorted({1.0} | {r["compression_ratio"] for r in report["results"]}, reverse=True)
    base = report["original"]["perplexity"]
    lines = ["| perplexity | " + " | ".join(f"ratio {x}" for x in ratios) + " |",
             "|---|" + "---:|" * len(ratios)]
    for label in dict.fromkeys(r["label"] for r in report["results"] if r["label"] != NO_SPLICE):
        cells = {1.0: f"{base:.4f}"} | {r["compression_ratio"]: f"{r['perplexity']:.4f} ({r['degradation_pct']:+.1f}%)"
                                        for r in report["results"] if r["label"] == label}
        lines.append(f"| {label} | " + " | ".join(cells.get(x, "") for x in ratios) + " |")
    return lines


def plot(report: dict, path: Path) -> None:
    """Perplexity against ratio, one line per initialisation (each starting from the original at 1.0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["original"]["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in report["results"] if r["label"] != NO_SPLICE):
        points = {1.0: base} | {r["compression_ratio"]: r["perplexity"] for r in report["results"] if r["label"] == label}
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], "o-", label=label)
    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"original ({base:.2f})")
    ax.set_xlabel("compression ratio (fraction of the latent kept)")
    ax.set_ylabel("perplexity")
    values = [base] + [r["perplexity"] for r in report["results"]]
    if max(values) / min(values) > 3:  # log scale only where the spread needs it, with plain labels
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            formatter = ScalarFormatter()
            formatter.set_scientific(False)
            axis(formatter)
    ax.set_title(f"{Path(report['model']).name}: {Path(report['text']['source']).name}, "
                 f"window {report['window']} / stride {report['stride']}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
