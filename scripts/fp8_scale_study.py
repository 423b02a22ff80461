"""Which fp8 scales for the cached code: per token, per token in 4 channel groups, per tensor or
per channel (both static, from calibration text), on the built-in trained model's held-out text.

Every scheme rounds the cached code through the patched transformers model (kvsplice.patch), so
attention sees what an fp8 cache would give back; the change is measured against the same model
with a bf16 cache, on the same windows, with a bootstrap interval over windows. Prints a table and
writes fp8_scales.json to --out.

    python scripts/fp8_scale_study.py --samples 60 --out docs/quality/fp8-scales
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvsplice.calibrate_job import DEFAULT_CALIB_FILE, build_splices, calibration_windows
from kvsplice.eval_job import DEFAULT_TEST_FILE
from kvsplice.kv_quant import fake_quantize, fp8_max
from kvsplice.model_source import load_pretrained
from kvsplice.patch import find_mla_layers, patch_model_with_kvsplice, unpatch_model
from kvsplice.perplexity import bootstrap_change, encode_text, perplexity, sliding_windows

E4M3 = torch.float8_e4m3fn


def per_token(code: torch.Tensor) -> torch.Tensor:
    return fake_quantize(code, E4M3)  # what the engine stores


def per_token_groups(groups: int):
    def fn(code: torch.Tensor) -> torch.Tensor:
        return per_token(code.unflatten(-1, (groups, -1))).flatten(-2)
    return fn


def static(amax: torch.Tensor):
    """A fixed scale (per tensor: amax is a scalar; per channel: [C]) from calibration maxima."""
    scale = (amax / fp8_max(E4M3)).clamp_min(1e-12)

    def fn(code: torch.Tensor) -> torch.Tensor:
        limit = fp8_max(E4M3)
        values = (code.float() / scale).clamp(-limit, limit).to(E4M3)
        return (values.float() * scale).to(code.dtype)
    return fn


def quantizer_slots(model) -> list:
    """The per-layer modules holding `quantize` after an fp8 patch (encoder or latent norm)."""
    return [a.kv_a_layernorm if a.kvsplice is None else a.kv_a_proj_with_mqa for a in find_mla_layers(model)]


def observe_maxima(model, calib: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the largest |code| per channel over the calibration windows."""
    maxima: list[torch.Tensor | None] = []
    for i, slot in enumerate(quantizer_slots(model)):
        maxima.append(None)

        def watch(code, i=i):
            m = code.detach().abs().flatten(0, -2).amax(0).float()
            maxima[i] = m if maxima[i] is None else torch.maximum(maxima[i], m)
            return code
        slot.quantize = watch
    with torch.no_grad():
        for batch in calib.split(4):
            model(input_ids=batch, use_cache=False)
    return maxima


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--ratios", default="1.0,0.5", help="1.0 is plain MLA; below it a PCA splice")
    ap.add_argument("--samples", type=int, default=60, help="held-out windows of 512 tokens, stride 256")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    model, tokenizer = load_pretrained(args.model, dtype=torch.float32, device="cpu")
    ids = encode_text(tokenizer, DEFAULT_TEST_FILE.read_text())
    windows = sliding_windows(len(ids), 512, 256, args.samples)
    calib = calibration_windows(tokenizer, DEFAULT_CALIB_FILE.read_text(), 512, 48_000, heldout_frac=0.0,
                                source=str(DEFAULT_CALIB_FILE)).fit
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        splices = None if ratio == 1.0 else build_splices(model, ratio, "pca", calib, 4)
        patch_model_with_kvsplice(model, ratio, splices=splices, kv_cache_dtype="bf16")
        base = perplexity(model, ids, windows, 4, desc=f"bf16 @ {ratio}")
        unpatch_model(model)
        patch_model_with_kvsplice(model, ratio, splices=splices, kv_cache_dtype="fp8")
        maxima = observe_maxima(model, calib[:16])
        schemes = {"per token": [per_token] * len(maxima),
                   "per token, 4 groups": [per_token_groups(4)] * len(maxima),
                   "per tensor (static)": [static(m.max()) for m in maxima],
                   "per channel (static)": [static(m) for m in maxima]}
        for name, fns in schemes.items():
            for slot, fn in zip(quantizer_slots(model), fns):
                slot.quantize = fn
            res = perplexity(model, ids, windows, 4, desc=f"{name} @ {ratio}")
            ci = bootstrap_change(res, base)
            rows.append({"ratio": ratio, "scales": name, "perplexity": res.perplexity, "bf16_perplexity": base.perplexity,
                         "change_pct": 100 * (res.perplexity / base.perplexity - 1), "ci95_pct": ci["perplexity_pct"],
                         "accuracy": res.accuracy, "bf16_accuracy": base.accuracy,
                         "accuracy_change_pts": 100 * (res.accuracy - base.accuracy), "ci95_pts": ci["accuracy_pts"]})
            r = rows[-1]
            print(f"ratio {ratio:<4} {name:<22} ppl {r['perplexity']:.4f} vs {base.perplexity:.4f}: "
                  f"{r['change_pct']:+.3f}% [{ci['perplexity_pct'][0]:+.3f}, {ci['perplexity_pct'][1]:+.3f}]  "
                  f"acc {r['accuracy_change_pts']:+.3f} pts [{ci['accuracy_pts'][0]:+.3f}, {ci['accuracy_pts'][1]:+.3f}]",
                  flush=True)
        unpatch_model(model)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"model": args.model, "windows": len(windows), "scored_tokens": base.tokens, "rows": rows,
                  "command": "python scripts/fp8_scale_study.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                            if v is not None)}
        (args.out / "fp8_scales.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
