"""Train a small DeepSeek-V2-architecture model on the public-domain corpus, within a time budget.

The model is the V2-Lite design scaled down: MLA with a 128-wide latent and a RoPE part, no q-LoRA,
MoE with shared experts (first layer dense), YaRN RoPE, untied lm_head; ~18M parameters, so the bf16
checkpoint is ~36 MB. It exists so KVSplice's quality can be measured on trained weights.

    python scripts/train_small_model.py --data CORPUS_DIR --out OUT_DIR --time-budget-s 330

CORPUS_DIR holds train.txt and validation.txt (`python -m kvsplice.corpus --out CORPUS_DIR`).
OUT_DIR receives the bf16 safetensors model, the tokenizer, training.json and loss.png.
The budget counts from process start: training stops early enough to evaluate and save within it.
CPU smoke test: `--device cpu --max-steps 3 --tiny`.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the budget includes start-up

import argparse
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
TOKENIZER_DIR = REPO / "kvsplice" / "data" / "tokenizer"
DOC_SEPARATOR = "\n\n\n"  # as written by kvsplice.corpus
# Seconds kept back from the budget for the final validation pass and the save (measured at the
# first evaluation; this floor covers the save and a slow first eval estimate).
MIN_RESERVE_S = 12.0


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------------- model


# Sizes on top of kvsplice.checkpoints' "lite" family (same YaRN RoPE, dense first layer, greedy
# top-k routing). ~18M parameters: 2 x 8192 x 384 in the embedding and the untied lm_head, the rest
# in 6 layers of MLA (128-wide latent + 32 RoPE dims) and MoE (8 routed experts, top 2, + 2 shared).
SMALL = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=6, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
             v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
             moe_intermediate_size=128)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=32)


def model_config(tokenizer, tiny: bool = False):
    """The DeepSeek-V2-Lite design at ~18M parameters (tiny: ~1.1M, mostly embeddings, for smoke tests)."""
    from kvsplice.checkpoints import small_config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.eos_token_id)
    return small_config("lite", vocab_size=len(tokenizer), **(TINY if tiny else SMALL), **ids)


def build_model(config, device: torch.device, experts_impl: str):
    from transformers import DeepseekV2ForCausalLM

    config._experts_implementation = experts_impl
    return DeepseekV2ForCausalLM(config).to(device)


# -------------------------------------------------------------------------------------------- data


def _chunks(document: str, size: int = 8192) -> list[str]:
    """Cut a document before a line that starts with a non-space character: the byte-level
    pre-tokenizer always ends a piece there, so encoding the chunks equals encoding the whole, and
    many chunks parallelise in `encode_batch` where a few huge documents do not."""
    out, start = [], 0
    for match in re.finditer(r"\n(?=\S)", document):
        if match.end() - start >= size:
            out.append(document[start:match.end()])
            start = match.end()
    out.append(document[start:])
    return out


def encode_split(tokenizer, path: Path, limit_bytes: int | None) -> torch.Tensor:
    """One token stream: <bos> doc <eos> <bos> doc <eos> ... (int32 to halve its memory)."""
    text = path.read_text(encoding="utf-8")
    if limit_bytes:
        text = text[:limit_bytes]
    backend = tokenizer.backend_tokenizer
    stream: list[int] = []
    for document in text.rstrip("\n").split(DOC_SEPARATOR):
        encoded = backend.encode_batch(_chunks(document), add_special_tokens=False)
        stream.append(tokenizer.bos_token_id)
        stream.extend(i for e in encoded for i in e.ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.int32)


def random_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random crops of seq_len + 1 tokens: fresh offsets every step, so repeated epochs
    over a small corpus do not show the model identical sequences."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen, device=stream.device)
    index = starts[:, None] + torch.arange(seq_len + 1, device=stream.device)
    return stream[index].long()


def eval_chunks(stream: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Non-overlapping chunks of seq_len + 1 tokens (each predicts seq_len tokens)."""
    n = (stream.numel() - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    index = torch.arange(n, device=stream.device)[:, None] * seq_len + torch.arange(seq_len + 1, device=stream.device)
    return stream[index].long()


# ---------------------------------------------------------------------------- routing observation


@dataclass
class RouterMonitor:
    """Hooks every MoE router: adds DeepSeek-V2's expert-level balance loss (alpha * E * sum f_i P_i)
    while training, and counts how many tokens each expert receives (logged to catch collapse).

    transformers' DeepseekV2Moe computes no auxiliary loss itself; without one a router from scratch
    may send most tokens to a few experts.
    """

    alpha: float
    num_experts: int
    losses: list[torch.Tensor] = field(default_factory=list)
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def attach(self, model) -> None:
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                self.handles.append(gate.register_forward_hook(lambda _m, _i, out, i=i: self._observe(i, out)))

    def _observe(self, layer: int, out) -> None:
        if not torch.is_grad_enabled():  # evaluation passes neither train nor count
            return
        router_logits, _, topk_indices = out
        hits = torch.bincount(topk_indices.reshape(-1), minlength=self.num_experts).float()
        self.counts[layer] = self.counts.get(layer, 0) + hits.detach()
        if self.alpha > 0:
            frac = hits / hits.sum()  # f_i / E in the paper's notation
            prob = router_logits.float().softmax(dim=-1).mean(dim=0)
            self.losses.append(self.alpha * self.num_experts * (frac * prob).sum())

    def take_loss(self) -> torch.Tensor | float:
        loss = sum(self.losses) if self.losses else 0.0
        self.losses = []
        return loss

    def take_load(self) -> dict:
        """max / ideal share of tokens per layer since the last call (1.0 = perfectly balanced)."""
        load = {}
        for layer, hits in sorted(self.counts.items()):
            share = hits / hits.sum().clamp(min=1)
            load[layer] = round(float(share.max() * self.num_experts), 2)
        self.counts = {}
        return load


# ----------------------------------------------------------------------------------------- training


def lr_at(step: int, progress: float, args) -> float:
    """Linear warm-up, then cosine to lr * min_lr_frac over `progress` in [0, 1] (the larger of the
    step and the time fraction used: with a time budget the number of steps is not known ahead)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cosine)


def lm_loss(model, tokens: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, chunks: torch.Tensor, batch: int, autocast: bool) -> float:
    """Mean token NLL over all chunks (every chunk scores seq_len tokens, so a plain mean is exact)."""
    model.eval()
    losses = [lm_loss(model, chunks[i:i + batch], autocast) * len(chunks[i:i + batch])
              for i in range(0, len(chunks), batch)]
    model.train()
    return float(torch.stack(losses).sum() / len(chunks))


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (1-d tensors)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


@dataclass
class History:
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)


@dataclass
class Best:
    """The best weights on validation so far (kept on the CPU): the corpus is small and many epochs
    can overfit it, so the saved model is the best one seen, not the last."""

    val_loss: float = float("inf")
    step: int = 0
    state: dict | None = None

    def offer(self, model, val_loss: float, step: int) -> None:
        if val_loss < self.val_loss:
            self.val_loss, self.step = val_loss, step
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Trainer:
    """The training loop with its three limits (steps, epochs, wall clock from process start)."""

    def __init__(self, model, train_stream, val_chunks, args, device) -> None:
        self.model, self.train_stream, self.val_chunks, self.args = model, train_stream, val_chunks, args
        self.autocast = device.type == "cuda"
        self.monitor = RouterMonitor(args.aux_loss_alpha, model.config.n_routed_experts)
        self.monitor.attach(model)
        self.optimizer = make_optimizer(model, args)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)
        self.history, self.best = History(), Best()
        self.step, self.tokens_seen = 0, 0
        # Seconds kept for the last evaluation and the save; grows with the measured eval time.
        self.reserve = MIN_RESERVE_S
        self.train_start = time.perf_counter()

    @property
    def epochs(self) -> float:
        return self.tokens_seen / self.train_stream.numel()

    def stop_reason(self) -> str | None:
        a = self.args
        if a.max_steps and self.step >= a.max_steps:
            return "max_steps"
        if a.max_epochs and self.epochs >= a.max_epochs:
            return "max_epochs"
        if a.time_budget_s and time.perf_counter() - _T0 >= a.time_budget_s - self.reserve:
            return "time_budget"
        return None

    def progress(self) -> float:
        """Fraction of the run done by the nearest limit: the schedule ends with whichever comes first."""
        a = self.args
        train_time = a.time_budget_s - self.reserve - (self.train_start - _T0) if a.time_budget_s else 0.0
        return max(self.step / a.max_steps if a.max_steps else 0.0,
                   self.epochs / a.max_epochs if a.max_epochs else 0.0,
                   (time.perf_counter() - self.train_start) / train_time if train_time > 0 else 0.0)

    def train_step(self) -> tuple[torch.Tensor, float]:
        lr = lr_at(self.step, self.progress(), self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens = random_batch(self.train_stream, self.args.batch_size, self.args.seq_len, self.gen)
        loss = lm_loss(self.model, tokens, self.autocast)
        self.optimizer.zero_grad(set_to_none=True)
        (loss + self.monitor.take_loss()).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += tokens[:, 1:].numel()
        return loss.detach(), lr

    def evaluate(self) -> None:
        start = time.perf_counter()
        val_loss = evaluate(self.model, self.val_chunks, self.args.batch_size, self.autocast)
        self.reserve = max(self.reserve, MIN_RESERVE_S + 1.5 * (time.perf_counter() - start))
        self.history.val.append({"step": self.step, "tokens": self.tokens_seen, "val_loss": val_loss,
                                 "elapsed_s": round(time.perf_counter() - _T0, 1)})
        self.best.offer(self.model, val_loss, self.step)
        log(f"step {self.step:6d}  val_loss {val_loss:.4f}  val_ppl {math.exp(val_loss):8.2f}  "
            f"(best {self.best.val_loss:.4f} @ {self.best.step})")

    def log_train(self, losses: list[torch.Tensor], lr: float, seconds: float) -> None:
        mean = float(torch.stack(losses).mean())  # one device sync per log line, not per step
        rate = len(losses) * self.args.batch_size * self.args.seq_len / seconds
        load = self.monitor.take_load()
        self.history.train.append({"step": self.step, "tokens": self.tokens_seen, "train_loss": mean, "lr": lr,
                                   "expert_load_max_over_ideal": load})
        log(f"step {self.step:6d}  loss {mean:.4f}  lr {lr:.2e}  {rate / 1e3:7.1f}k tok/s  epochs {self.epochs:5.2f}  "
            f"expert load max/ideal by layer {list(load.values())}")

    def run(self) -> dict:
        self.model.train()
        self.evaluate()
        losses, window_start, reason = [], time.perf_counter(), None
        while (reason := self.stop_reason()) is None:
            loss, lr = self.train_step()
            losses.append(loss)
            if self.step % self.args.log_every == 0:
                self.log_train(losses, lr, time.perf_counter() - window_start)
                losses, window_start = [], time.perf_counter()
            if self.step % self.args.eval_every == 0:
                self.evaluate()
        log(f"stopping: {reason}")
        if self.history.val[-1]["step"] != self.step:
            self.evaluate()
        self.model.load_state_dict(self.best.state)
        return {"steps": self.step, "tokens_seen": self.tokens_seen, "epochs": self.epochs, "stop_reason": reason,
                "best_step": self.best.step, "best_val_loss": self.best.val_loss, "history": self.history}


# ------------------------------------------------------------------------------------------- output


def plot_losses(history: History, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if history.train:
        ax.plot([h["tokens"] / 1e6 for h in history.train], [h["train_loss"] for h in history.train], label="train")
    ax.plot([h["tokens"] / 1e6 for h in history.val], [h["val_loss"] for h in history.val], "o-", label="validation")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("small DeepSeek-V2 (MLA + MoE) on Shakespeare + KJV")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_outputs(model, tokenizer, result: dict, args, device, extra: dict) -> None:
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    try:
        plot_losses(result["history"], out / "loss.png")
    except ImportError as exc:  # the model and training.json matter more than the picture
        log(f"no loss.png: {exc}")
    val_loss = result["best_val_loss"]
    report = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "steps": result["steps"],
        "tokens_seen": result["tokens_seen"],
        "epochs": round(result["epochs"], 3),
        "stop_reason": result["stop_reason"],
        "saved_weights": f"best validation loss, step {result['best_step']}",
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "val_eval": f"non-overlapping {args.seq_len}-token chunks of validation.txt, each scoring all its tokens",
        "wall_time_s": round(time.perf_counter() - _T0, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loss_curve": {"train": result["history"].train, "val": result["history"].val},
        **extra,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dir with train.txt and validation.txt")
    p.add_argument("--out", type=Path, required=True, help="output dir for the model")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR)
    p.add_argument("--time-budget-s", type=float, default=330.0,
                   help="wall-clock seconds from process start to finish training, eval and save (0: none)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a ~1.1M-parameter model, 200 KB of data, short sequences (smoke test)")
    p.add_argument("--max-epochs", type=float, default=12.0,
                   help="stop after this many passes over train.txt (0: no limit); the corpus is small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-loss-alpha", type=float, default=0.01, help="expert balance loss weight (0: off)")
    p.add_argument("--experts-impl", default="eager", choices=["eager", "grouped_mm", "batched_mm"],
                   help="transformers' MoE experts kernel (eager: a plain loop, the safe default for training)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=0, help="cap on validation tokens (0: the whole split)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--limit-bytes", type=int, default=0, help="read only this many bytes of each split")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:  # smoke-test sizes, for the flags left at their defaults
        for name, value in dict(limit_bytes=200_000, seq_len=64, batch_size=4, warmup_steps=10,
                                eval_tokens=1024, log_every=1).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    for name in ("train.txt", "validation.txt"):
        if not (args.data / name).is_file():
            p.error(f"--data: {args.data / name} not found (build it with `python -m kvsplice.corpus --out DIR`)")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    log(f"tokenizing {args.data} (vocab {len(tokenizer)})")
    train_stream = encode_split(tokenizer, args.data / "train.txt", args.limit_bytes).to(device)
    val_stream = encode_split(tokenizer, args.data / "validation.txt", args.limit_bytes).to(device)
    val_chunks = eval_chunks(val_stream, args.seq_len, args.eval_tokens)
    log(f"train {train_stream.numel():,} tokens, validation {val_stream.numel():,} ({len(val_chunks)} chunks)")

    config = model_config(tokenizer, args.tiny)
    model = build_model(config, device, args.experts_impl)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters ({n_params * 2 / 1e6:.1f} MB in bf16) on {device}")

    result = Trainer(model, train_stream, val_chunks, args, device).run()
    extra = {"parameters": n_params, "train_tokens": train_stream.numel(), "val_tokens": val_stream.numel(),
             "config": {k: v for k, v in config.to_dict().items() if not k.startswith("_")}}
    save_outputs(model, tokenizer, result, args, device, extra)
    log(f"done: {result['steps']} steps, {result['tokens_seen']:,} tokens ({result['epochs']:.2f} epochs), "
        f"val ppl {math.exp(result['best_val_loss']):.2f} (step {result['best_step']}), saved to {args.out}")


if __name__ == "__main__":
    main()
