"""The calibration job behind `kvsplice calibrate`: build per-layer splices for a model from text.

Calibration text is tokenized into one stream and cut into non-overlapping windows; the last
`heldout_frac` of them are held out. Splices are fitted on the rest (PCA of the latents, then
optionally distillation fine-tuning) and measured on the held-out windows, so the figures saved
with them are not measured on the data they were fitted to.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kvsplice.calibration import collect_latents, pca_splices, reconstruction_error
from kvsplice.finetune import FinetuneConfig, FinetuneResult, finetune_splices, plot_finetune
from kvsplice.patch import make_splices
from kvsplice.perplexity import encode_text
from kvsplice.splice import LearnedKVSplice
from kvsplice.storage import save_splices

DEFAULT_CALIB_FILE = Path(__file__).parent / "data" / "corpus" / "calib.txt"
CALIB_INITS = ("truncate", "orthogonal", "pca")


@dataclass
class CalibrationWindows:
    fit: torch.Tensor  # [n_fit, window] token ids
    heldout: torch.Tensor  # [n_heldout, window]
    source: str

    def describe(self) -> dict:
        return {"calibration_text": self.source, "window": int(self.fit.shape[1]),
                "fit_windows": len(self.fit), "heldout_windows": len(self.heldout),
                "fit_tokens": self.fit.numel(), "heldout_tokens": self.heldout.numel()}


def calibration_windows(
    tokenizer, text: str, window: int, max_tokens: int, heldout_frac: float = 0.2, source: str = ""
) -> CalibrationWindows:
    """Non-overlapping windows spread evenly over the whole text (at most max_tokens in all), with
    every k-th one held out (k = 1 / heldout_frac; none when heldout_frac is 0).

    Spreading matters: a calibration file is several documents one after another (calib.txt is
    Bible books then plays), and the first N tokens, or a held-out tail, would be one of them only.
    """
    ids = encode_text(tokenizer, text)
    total = len(ids) // window
    n = min(total, max_tokens // window)
    needed = 2 if heldout_frac > 0 else 1
    if n < needed:
        raise ValueError(f"need at least {needed} calibration windows of {window} tokens; the text and the "
                         f"token limit give {min(len(ids), max_tokens)} tokens")
    windows = ids[: total * window].view(total, window)
    windows = windows[torch.linspace(0, total - 1, n).round().long()]
    if heldout_frac == 0:
        return CalibrationWindows(windows, windows[:0], source)
    every = max(2, round(1 / heldout_frac))
    held = torch.zeros(n, dtype=torch.bool)
    held[every - 1::every] = True
    if not held.any():
        held[-1] = True
    return CalibrationWindows(windows[~held], windows[held], source)


def _batches(windows: torch.Tensor, batch_size: int):
    return (windows[i:i + batch_size] for i in range(0, len(windows), batch_size))


def build_splices(
    model: nn.Module, ratio: float, init: str, fit_windows: torch.Tensor | None = None,
    batch_size: int = 4, seed: int = 0,
) -> list[LearnedKVSplice]:
    """Per-layer float32 splices: data-free (`truncate`, `orthogonal`) or PCA of the latents the
    unpatched model produces on fit_windows."""
    if init == "pca":
        if fit_windows is None:
            raise ValueError("pca needs calibration windows")
        batches = list(_batches(fit_windows, batch_size))
        latents = collect_latents(model, batches, desc="latents for PCA")
        return pca_splices(latents, ratio, progress=True)
    if init not in CALIB_INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {CALIB_INITS}")
    return make_splices(model.config, ratio, init, seed=seed)


def heldout_reconstruction(model: nn.Module, splices, heldout: torch.Tensor, batch_size: int) -> list[float]:
    """Per-layer relative squared error of decode(encode(c)) on the held-out latents."""
    latents = collect_latents(model, _batches(heldout, batch_size))
    return [reconstruction_error(s, c) for s, c in zip(splices, latents)]


@dataclass
class CalibrationOutcome:
    splices: list[LearnedKVSplice]
    info: dict = field(default_factory=dict)
    finetune: FinetuneResult | None = None


def calibrate(
    model: nn.Module,
    windows: CalibrationWindows,
    ratio: float,
    init: str = "pca",
    finetune: FinetuneConfig | None = None,
    batch_size: int = 4,
    seed: int = 0,
) -> CalibrationOutcome:
    """Fit the splices (and fine-tune them when `finetune` is given); `model` is left unpatched."""
    start = time.perf_counter()
    splices = build_splices(model, ratio, init, windows.fit, batch_size, seed)
    info = {"init": init, "compression_ratio": ratio, "rank": splices[0].rank, **windows.describe(),
            "heldout_reconstruction_error": heldout_reconstruction(model, splices, windows.heldout, batch_size)}
    result = None
    if finetune is not None:
        result = finetune_splices(model, splices, windows.fit, windows.heldout, finetune)
        info |= {"finetune": {"steps": finetune.steps, "lr": finetune.lr, "batch_size": finetune.batch_size,
                              "objective": "KL(unpatched || patched) next-token, mean per token",
                              **result.as_dict()},
                 "heldout_reconstruction_error_after_finetune":
                     heldout_reconstruction(model, splices, windows.heldout, batch_size)}
    info["seconds"] = round(time.perf_counter() - start, 2)
    return CalibrationOutcome(splices, info, result)


# ---------------------------------------------------------------------------------------- the job


def run_calibrate(args: argparse.Namespace) -> int:
    """`kvsplice calibrate`: load the model, calibrate, save the splices (+ a loss plot when tuned)."""
    from kvsplice.model_source import load_pretrained

    torch.manual_seed(args.seed)
    model, tokenizer = load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    text_path = Path(args.data)
    windows = calibration_windows(tokenizer, text_path.read_text(encoding="utf-8"), args.window,
                                  args.max_tokens, args.heldout_frac, source=str(text_path))
    tune = None
    if args.finetune:
        tune = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                              eval_every=args.eval_every, seed=args.seed)
    print(f"calibrating {args.model}: ratio {args.compression_ratio}, init {args.init}"
          f"{' + fine-tune' if tune else ''}, {windows.fit.numel():,} fit / {windows.heldout.numel():,} held-out tokens",
          flush=True)
    outcome = calibrate(model, windows, args.compression_ratio, args.init, tune, args.batch_size, args.seed)
    outcome.info |= {"model": args.model, "command": getattr(args, "command_line", "")}
    out = save_splices(args.out, outcome.splices, model, extra=outcome.info)
    recon = outcome.info["heldout_reconstruction_error"]
    print(f"saved {out}: {len(outcome.splices)} layers, rank {outcome.splices[0].rank}/"
          f"{outcome.splices[0].latent_dim}, held-out reconstruction error "
          f"{sum(recon) / len(recon):.4f} (mean over layers)")
    if outcome.finetune is not None:
        plot = out.with_suffix(".finetune.png")
        try:
            plot_finetune(outcome.finetune, plot, f"{args.model}: ratio {args.compression_ratio}, from {args.init}")
        except ImportError as exc:  # matplotlib is optional where only the splices are needed
            plot = f"none ({exc})"
        r = outcome.finetune
        print(f"fine-tune: held-out KL {r.initial_kl:.5f} -> {r.best_kl:.5f} (kept step {r.best_step}); plot {plot}")
    if args.json:
        print(json.dumps(outcome.info, indent=2))
    return 0
