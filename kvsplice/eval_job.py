"""The offline perplexity job behind `kvsplice eval`: the original model against spliced versions.

One run evaluates the unpatched model once and then every (initialisation, ratio) pair and every
splice file, each with every cache storage asked for (--kv-cache-dtype: unrounded, bf16, fp8), on
the same strided windows of the same text, prints the perplexity table, and writes
perplexity.json, perplexity.md and perplexity.png to the output directory when one is given.
Ratio 1.0 means no splice (plain MLA) and is evaluated like the others, as a check that it
reproduces the original exactly. Each row also gets the next-token accuracy (a second measure,
not perplexity) and 95% bootstrap intervals over windows for both changes, paired against the
original; with several storages, a table sorted by KV bytes per token compares them at matched
memory.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from kvsplice.cache_layout import CacheLayout
from kvsplice.calibrate_job import build_splices, calibration_windows
from kvsplice.patch import patch_model_with_kvsplice, unpatch_model
from kvsplice.perplexity import PerplexityResult, bootstrap_change, encode_text, perplexity, sliding_windows
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
    kv_cache_dtype: str = "auto"  # how the cache stores the code: auto (unrounded), bf16, fp8, fp8_e5m2

    @property
    def line(self) -> str:
        """The label with its storage: one plot line and pivot row per (splices, storage)."""
        return self.label if self.kv_cache_dtype == "auto" else f"{self.label}, {self.kv_cache_dtype}"


NO_SPLICE = "no splice"


def plan_variants(ratios: list[float], inits: list[str], splice_files: list[str],
                  kv_cache_dtypes: list[str] = ("auto",)) -> list[Variant]:
    """Every init at every ratio below 1.0, plus ratio 1.0 once (no splice, whatever the init), and
    every splice file; each with every cache storage."""
    variants = [Variant(NO_SPLICE, 1.0)] if (inits or len(kv_cache_dtypes) > 1) and 1.0 in ratios else []
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
    return [dataclasses.replace(v, kv_cache_dtype=kv) for kv in kv_cache_dtypes for v in variants]


class SpliceCache:
    """Each variant's splices, built once however many storages it is evaluated with."""

    def __init__(self, model: nn.Module, calib: torch.Tensor | None, batch_size: int) -> None:
        self.model, self.calib, self.batch_size = model, calib, batch_size
        self._built: dict[tuple, list | None] = {}

    def get(self, variant: Variant):
        """The splices of a variant, or None for "no splice" (ratio 1.0 with an initialisation)."""
        key = (variant.splices_file, variant.init, variant.ratio)
        if key not in self._built:
            if variant.splices_file:
                self._built[key] = load_splices(variant.splices_file, self.model)
            elif variant.init is None:
                self._built[key] = None  # KVSplice defines ratio 1.0 as plain MLA: nothing to patch
            else:
                self._built[key] = build_splices(self.model, variant.ratio, variant.init, self.calib, self.batch_size)
        return self._built[key]


def evaluate_variant(model, ids, windows, variant, splices: SpliceCache, batch_size) -> PerplexityResult:
    patch_model_with_kvsplice(model, variant.ratio, splices=splices.get(variant), kv_cache_dtype=variant.kv_cache_dtype)
    try:
        return perplexity(model, ids, windows, batch_size, desc=f"{variant.line} @ {variant.ratio}")
    finally:
        unpatch_model(model)


def evaluate_all(model, ids, windows, variants, calib, batch_size) -> tuple[PerplexityResult, list[dict]]:
    """The original model, then every variant, on the same windows."""
    original = perplexity(model, ids, windows, batch_size, desc="original")
    splices = SpliceCache(model, calib, batch_size)
    rows = []
    for variant in variants:
        result = evaluate_variant(model, ids, windows, variant, splices, batch_size)
        rows.append(_row(model.config, variant, result, original))
        r = rows[-1]
        print(f"  {variant.line:<28} ratio {variant.ratio:<5} ppl {result.perplexity:10.4f}  "
              f"({r['degradation_pct']:+.2f}% [{r['ci95_pct'][0]:+.2f}, {r['ci95_pct'][1]:+.2f}]), "
              f"accuracy {100 * result.accuracy:.2f}%", flush=True)
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
    variants = plan_variants(args.ratios, args.inits, args.splices, getattr(args, "kv_cache_dtype", ["auto"]))
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
    # Bytes as served: a bf16 model's cache, the code in bf16 (auto and bf16) or fp8.
    served = "auto" if variant.kv_cache_dtype in ("auto", "bf16") else variant.kv_cache_dtype
    layout = CacheLayout.for_ratio(config, variant.ratio, torch.bfloat16, kv_cache_dtype=served)
    ci = bootstrap_change(result, original)
    return {
        "label": variant.label, "line": variant.line, "init": variant.init, "splices_file": variant.splices_file,
        "compression_ratio": variant.ratio, "rank": layout.code_dim, "kv_cache_dtype": variant.kv_cache_dtype,
        "kv_bytes_per_token": layout.bytes_per_token,
        "perplexity": result.perplexity, "mean_nll": result.mean_nll, "tokens": result.tokens,
        "degradation_pct": 100.0 * (result.perplexity / original.perplexity - 1.0), "ci95_pct": ci["perplexity_pct"],
        "accuracy": result.accuracy, "accuracy_change_pts": 100.0 * (result.accuracy - original.accuracy),
        "ci95_accuracy_pts": ci["accuracy_pts"],
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
        f"Original (no splice, unrounded cache): perplexity **{o['perplexity']:.4f}** (mean NLL {o['mean_nll']:.5f}), "
        f"next-token accuracy {100 * o['accuracy']:.2f}%. Intervals: 95%, bootstrap over windows, paired with the "
        "original. KV bytes per token as served (bf16 model; auto counts as bf16).",
        "",
        "| splices | ratio | rank | cache | KV bytes/token | perplexity | vs original [95% CI] | next-token acc. "
        "| vs original, points [95% CI] |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(_result_line(r, with_ratio=True))
    if len({r.get("kv_cache_dtype", "auto") for r in report["results"]}) > 1:
        lines += ["", "At matched memory (sorted by KV bytes per token):", "",
                  "| KV bytes/token | splices | ratio | cache | perplexity | vs original [95% CI] | next-token acc. "
                  "| vs original, points [95% CI] |", "|---:|---|---:|---|---:|---:|---:|---:|"]
        for r in sorted(report["results"], key=lambda r: -r["kv_bytes_per_token"]):
            lines.append(_result_line(r, with_ratio=False))
    lines += ["", *pivot_table(report)]
    lines += ["", f"Command: `{report['command']}`" if report["command"] else "",
              f"Device {report['device']}, {report['dtype']}, " +
              ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def _result_line(r: dict, with_ratio: bool) -> str:
    ci, acc_ci = r.get("ci95_pct"), r.get("ci95_accuracy_pts")
    change = f"{r['degradation_pct']:+.2f}%" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
    acc = f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else ""
    acc_change = f"{r['accuracy_change_pts']:+.2f} [{acc_ci[0]:+.2f}, {acc_ci[1]:+.2f}]" if acc_ci else ""
    cache = r.get("kv_cache_dtype", "auto")
    if with_ratio:
        head = f"| {r['label']} | {r['compression_ratio']} | {r['rank']} | {cache} | {r['kv_bytes_per_token']:,} "
    else:
        head = f"| {r['kv_bytes_per_token']:,} | {r['label']} | {r['compression_ratio']} | {cache} "
    return head + f"| {r['perplexity']:.4f} | {change} | {acc} | {acc_change} |"


def _lines(report: dict) -> dict[str, dict[float, dict]]:
    """Results by line (splices and storage) and ratio; a line's ratio 1.0 is the no-splice row of
    its storage, or the original where there is none."""
    ones = {r.get("line", r["label"]).removeprefix(NO_SPLICE).lstrip(", "): r
            for r in report["results"] if r["label"] == NO_SPLICE}
    original = dict(report["original"], degradation_pct=0.0)
    lines: dict[str, dict[float, dict]] = {}
    for r in report["results"]:
        if r["label"] == NO_SPLICE:
            continue
        line = r.get("line", r["label"])
        storage = r.get("kv_cache_dtype", "auto")
        lines.setdefault(line, {1.0: ones.get("" if storage == "auto" else storage, original)})
        lines[line][r["compression_ratio"]] = r
    return lines


def pivot_table(report: dict) -> list[str]:
    """Perplexity by splices and storage (rows) and ratio (columns)."""
    ratios = sorted({1.0} | {r["compression_ratio"] for r in report["results"]}, reverse=True)
    lines = ["| perplexity | " + " | ".join(f"ratio {x}" for x in ratios) + " |",
             "|---|" + "---:|" * len(ratios)]
    for line, points in _lines(report).items():
        cells = {x: f"{r['perplexity']:.4f} ({r['degradation_pct']:+.1f}%)" for x, r in points.items()}
        lines.append(f"| {line} | " + " | ".join(cells.get(x, "") for x in ratios) + " |")
    return lines


def plot(report: dict, path: Path) -> None:
    """Perplexity against ratio, one line per initialisation and storage (fp8 dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["original"]["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line, points in _lines(report).items():
        xs = sorted(points)
        ax.plot(xs, [points[x]["perplexity"] for x in xs], "o--" if ", fp8" in line else "o-", label=line)
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
