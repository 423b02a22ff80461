"""Perplexity with strided sliding windows: exp of the mean next-token NLL over a token stream.

The text is tokenized once into a single stream. Window k covers tokens [begin, end) with
begin = k * stride and end = begin + window, and scores only the tokens the previous window did not
(its last `stride` tokens; the first window scores all its tokens but the first, which has no
context). Every scored token thus gets at least `window - stride` tokens of context, each token is
scored once, and the same windows give the same number whatever model runs on them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    first_scored: int  # first position (absolute) whose token is scored

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.first_scored


@dataclass(frozen=True)
class WindowScore:
    nll: float  # summed over the window's scored tokens
    tokens: int
    correct: int  # scored tokens whose most likely prediction was the actual next token


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # natural-log NLL summed over scored tokens
    tokens: int  # scored tokens
    windows: int
    correct: int = 0  # scored tokens predicted right by the argmax (next-token accuracy)
    per_window: tuple[WindowScore, ...] = ()  # for confidence intervals over windows

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["per_window"]
        return d | {"mean_nll": self.mean_nll, "perplexity": self.perplexity, "accuracy": self.accuracy}


def bootstrap_change(result: PerplexityResult, baseline: PerplexityResult, samples: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Confidence intervals of the change from `baseline`, resampling windows (paired: the same
    windows for both), for the perplexity change (%) and the accuracy change (points)."""
    a = torch.tensor([(w.nll, w.tokens, w.correct) for w in result.per_window], dtype=torch.float64)
    b = torch.tensor([(w.nll, w.tokens, w.correct) for w in baseline.per_window], dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0 or not torch.equal(a[:, 1], b[:, 1]):
        raise ValueError("bootstrap needs per-window scores of the same windows")
    picks = torch.randint(len(a), (samples, len(a)), generator=torch.Generator().manual_seed(seed))
    sa, sb = a[picks].sum(1), b[picks].sum(1)  # [samples, 3]: nll, tokens, correct
    ppl_pct = 100 * (torch.exp(sa[:, 0] / sa[:, 1] - sb[:, 0] / sb[:, 1]) - 1)
    acc_pts = 100 * (sa[:, 2] - sb[:, 2]) / sa[:, 1]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {"perplexity_pct": tuple(torch.quantile(ppl_pct, q).tolist()),
            "accuracy_pts": tuple(torch.quantile(acc_pts, q).tolist())}


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-d token stream (with the tokenizer's BOS if it adds one)."""
    # The stream is cut into windows here, so the tokenizer's model_max_length does not apply.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = backend.encode(text).ids
    else:
        ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sliding_windows(n_tokens: int, window: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """The strided windows over a stream of n_tokens (see the module docstring)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    windows: list[Window] = []
    prev_end = 1  # token 0 is never scored: nothing precedes it
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append(Window(begin, end, prev_end))
        prev_end = end
        if end == n_tokens or (max_windows and len(windows) >= max_windows):
            break
    return windows


def _batches(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most batch_size per batch (no padding needed)."""
    batches: list[list[Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == w.length:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


@torch.no_grad()
def window_scores(model: nn.Module, ids: torch.Tensor, batch: Sequence[Window]) -> list[WindowScore]:
    """NLL, count and argmax hits of the scored tokens of equal-length windows, in one forward pass."""
    device = next(model.parameters()).device
    inputs = torch.stack([ids[w.begin:w.end] for w in batch]).to(device)
    logits = model(input_ids=inputs, use_cache=False).logits[:, :-1].float()
    targets = inputs[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, L-1]
    hits = logits.argmax(-1) == targets
    # Position j of nll predicts token begin + j + 1: keep those at or after first_scored.
    offsets = torch.tensor([w.first_scored - w.begin - 1 for w in batch], device=device)
    keep = torch.arange(nll.shape[1], device=device)[None, :] >= offsets[:, None]
    return [WindowScore(float(n[k].double().sum()), int(k.sum()), int(h[k].sum()))
            for n, h, k in zip(nll, hits, keep)]


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    windows: Sequence[Window],
    batch_size: int = 4,
    desc: str | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on the stream `ids` over `windows` (eval mode, no cache)."""
    was_training = model.training
    model.eval()
    scores: list[WindowScore] = []
    try:
        batches = _batches(windows, batch_size)
        for batch in tqdm(batches, desc=desc or "perplexity", leave=False, disable=desc is None):
            scores += window_scores(model, ids, batch)
    finally:
        model.train(was_training)
    return PerplexityResult(nll_sum=sum(s.nll for s in scores), tokens=sum(s.tokens for s in scores),
                            windows=len(windows), correct=sum(s.correct for s in scores), per_window=tuple(scores))
