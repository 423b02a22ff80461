"""Fine-tune splices by distillation: the base model is frozen, only the splice parameters learn.

Objective: KL(p_orig || p_spliced) of the next-token distributions, averaged over tokens, where
p_orig comes from the unpatched model and p_spliced from the same model patched with the splices
(its forward with use_cache=False still runs encode -> decode, so gradients reach the splices).
This targets what the splice must preserve, the model's predictions, rather than the latent
itself (which PCA already reconstructs optimally in squared error, though not every latent
direction matters equally to the outputs).

The objective is measured on held-out windows at the start and every `eval_every` steps; the best
parameters seen (the initial ones included) are kept, so fine-tuning never ends worse than its
initialisation on that measure.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kvsplice.patch import is_patched, patch_model_with_kvsplice, unpatch_model
from kvsplice.splice import LearnedKVSplice


@dataclass
class FinetuneConfig:
    steps: int = 200
    lr: float = 3e-4
    batch_size: int = 4  # windows per step
    eval_every: int = 25
    warmup_frac: float = 0.1  # linear warm-up over this share of the steps
    min_lr_frac: float = 0.1  # then cosine decay to lr * min_lr_frac
    seed: int = 0
    progress: bool = True


@dataclass
class FinetuneResult:
    initial_kl: float  # held-out objective at initialisation
    best_kl: float  # held-out objective of the parameters kept
    best_step: int  # 0 = the initialisation was never beaten
    steps: int
    train_curve: list[dict] = field(default_factory=list)  # {"step", "kl"} per step (tuning windows)
    heldout_curve: list[dict] = field(default_factory=list)  # {"step", "kl"} per evaluation

    def as_dict(self) -> dict:
        return {"initial_heldout_kl": self.initial_kl, "best_heldout_kl": self.best_kl,
                "best_step": self.best_step, "steps": self.steps, "heldout_curve": self.heldout_curve}


@contextmanager
def spliced(model: nn.Module, splices: Sequence[LearnedKVSplice]):
    """Patch the model with these splice objects for the duration (the same parameters, not copies)."""
    patch_model_with_kvsplice(model, splices[0].compression_ratio, splices=splices)
    try:
        yield model
    finally:
        unpatch_model(model)


def _logprobs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=inputs, use_cache=False).logits.float(), dim=-1)


def distillation_kl(model: nn.Module, splices: Sequence[LearnedKVSplice], inputs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(unpatched || patched) on a batch of windows [B, L] (differentiable
    w.r.t. the splices; the unpatched model is run without grad)."""
    with torch.no_grad():
        teacher = _logprobs(model, inputs)
    with spliced(model, splices):
        student = _logprobs(model, inputs)
    kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="sum")
    return kl / (inputs.shape[0] * inputs.shape[1])


@torch.no_grad()
def heldout_kl(model: nn.Module, splices: Sequence[LearnedKVSplice], windows: torch.Tensor, batch_size: int) -> float:
    """The objective on all given windows (token-weighted mean)."""
    total = sum(float(distillation_kl(model, splices, windows[i:i + batch_size])) * len(windows[i:i + batch_size])
                for i in range(0, len(windows), batch_size))
    return total / len(windows)


@contextmanager
def _only_splices_trainable(model: nn.Module, splices: Sequence[LearnedKVSplice]):
    """Freeze the base model (restoring its flags after) and make the splices trainable; eval mode,
    since the teacher and the student must be the same deterministic function apart from the splice."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    for splice in splices:
        splice.requires_grad_(True)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _snapshot(splices: Sequence[LearnedKVSplice]) -> list[dict]:
    return [{k: v.detach().clone() for k, v in s.state_dict().items()} for s in splices]


def finetune_splices(
    model: nn.Module,
    splices: Sequence[LearnedKVSplice],
    tune_windows: torch.Tensor,
    heldout_windows: torch.Tensor,
    config: FinetuneConfig | None = None,
) -> FinetuneResult:
    """Distil the unpatched model into its spliced version, training the splices in place.

    `model` must be unpatched and in float32 (the splices train in the model's dtype); the windows
    are token ids [n, L] on any device. On return the splices hold the best parameters seen on
    `heldout_windows` and are marked `init_method = "learned"`.
    """
    config = config or FinetuneConfig()
    if is_patched(model):
        raise ValueError("fine-tune on the unpatched model: it is the teacher")
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ValueError(f"fine-tuning needs the model in float32, got {param.dtype}")
    for splice in splices:
        splice.to(device=param.device, dtype=torch.float32)
    tune_windows, heldout_windows = tune_windows.to(param.device), heldout_windows.to(param.device)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for s in splices for p in s.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    with _only_splices_trainable(model, splices):
        best_kl = initial_kl = heldout_kl(model, splices, heldout_windows, config.batch_size)
        best_state, best_step = _snapshot(splices), 0
        result = FinetuneResult(initial_kl, initial_kl, 0, config.steps, heldout_curve=[{"step": 0, "kl": initial_kl}])
        bar = tqdm(range(1, config.steps + 1), desc="fine-tune splices", disable=not config.progress)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, config)
            pick = torch.randint(0, len(tune_windows), (config.batch_size,), generator=gen)
            loss = distillation_kl(model, splices, tune_windows[pick.to(tune_windows.device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.train_curve.append({"step": step, "kl": loss.item()})
            if step % config.eval_every == 0 or step == config.steps:
                kl = heldout_kl(model, splices, heldout_windows, config.batch_size)
                result.heldout_curve.append({"step": step, "kl": kl})
                if kl < best_kl:
                    best_kl, best_state, best_step = kl, _snapshot(splices), step
                bar.set_postfix(train_kl=f"{loss.item():.4f}", heldout_kl=f"{kl:.4f}", best=f"{best_kl:.4f}")

    for splice, state in zip(splices, best_state):
        splice.load_state_dict(state)
        splice.requires_grad_(False)
        splice.init_method = "learned"
    result.best_kl, result.best_step = best_kl, best_step
    return result


def _cosine_lr(step: int, config: FinetuneConfig) -> float:
    """Warm-up first: Adam's first updates move every weight by about lr whatever its gradient, which
    knocks a good (PCA) starting point off before the moment estimates settle."""
    warmup = max(1, round(config.warmup_frac * config.steps))
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (config.min_lr_frac + (1 - config.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def plot_finetune(result: FinetuneResult, path, title: str = "") -> None:
    """Training KL per step and held-out KL per evaluation (the kept point marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if result.train_curve:
        ax.plot([p["step"] for p in result.train_curve], [p["kl"] for p in result.train_curve],
                alpha=0.5, label="tuning windows (per step)")
    ax.plot([p["step"] for p in result.heldout_curve], [p["kl"] for p in result.heldout_curve], "o-",
            label="held-out windows")
    ax.plot([result.best_step], [result.best_kl], "r*", markersize=14, label=f"kept (step {result.best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(original || spliced), nats/token")
    ax.set_yscale("log")
    ax.set_title(title or "splice fine-tuning by distillation")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
