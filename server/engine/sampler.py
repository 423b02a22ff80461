"""Turns each sequence's next-token logits into a token (greedy, temperature, top-k, top-p) and its
log-probabilities. Seeded requests draw from their own generator, so a seed reproduces a sample
whatever else is in the batch.

Each row is sampled on its own terms: a row that cannot be sampled (NaN logits, a draw that
fails) is reported in `Sampled.errors` and the other rows keep their tokens. If a batch-wide
operation fails, the batch is redone row by row so that only the row at fault fails.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.engine import faults
from server.engine.outputs import TokenLogprob
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)
FAILED = -1  # the token of a row that could not be sampled


@dataclass
class Sampled:
    tokens: list[int] = field(default_factory=list)  # FAILED where the row failed
    records: list[TokenLogprob | None] = field(default_factory=list)
    errors: dict[int, Exception] = field(default_factory=dict)  # row -> why it could not be sampled

    def add(self, token: int, record: TokenLogprob | None, error: Exception | None = None) -> None:
        if error is not None:
            self.errors[len(self.tokens)] = error
        self.tokens.append(token)
        self.records.append(record)


def sample(logits: Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> Sampled:
    """logits [B, V] (float32) for `seqs` in order -> a token and a log-probability record per row."""
    try:
        return _sample_batch(logits, seqs, eos_token_ids)
    except Exception:  # noqa: BLE001 - a batch-wide op failed: find the row at fault by going one by one
        log.warning("batched sampling failed; sampling %d rows one by one", len(seqs), exc_info=True)
        return _sample_rows(logits, seqs, eos_token_ids)


def _sample_rows(logits: Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> Sampled:
    result = Sampled()
    for i, seq in enumerate(seqs):
        try:
            row = _sample_batch(logits[i : i + 1], [seq], eos_token_ids)
            result.add(row.tokens[0], row.records[0], row.errors.get(0))
        except Exception as exc:  # noqa: BLE001 - this row alone fails
            result.add(FAILED, None, exc)
    return result


def _sample_batch(logits: Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> Sampled:
    want = [s.params.logprobs is not None for s in seqs]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want) else None  # skipped on the common path
    nan_rows = logits.isnan().any(dim=-1).tolist()  # a broken row; -inf (banned tokens) is fine
    logits = _block_early_stop(logits, seqs, eos_token_ids)
    greedy_tokens = logits.argmax(dim=-1).tolist()  # greedy rows are done; the others are redrawn below
    result = Sampled()
    for i, seq in enumerate(seqs):
        try:
            if nan_rows[i]:
                raise FloatingPointError("the model produced NaN logits for this sequence")
            token = _pick(logits[i], seq, greedy_tokens[i])
            record = token_logprob(logprobs[i], token, seq.params.logprobs) if want[i] else None
            result.add(token, record)
        except Exception as exc:  # noqa: BLE001 - one row's failure is that request's, not the batch's
            result.add(FAILED, None, exc)
    return result


def _pick(row: Tensor, seq: Sequence, greedy_token: int) -> int:
    faults.check("sample", seq.params.seed)
    return greedy_token if seq.params.greedy else _draw(row, seq)


def token_logprob(row_logprobs: Tensor, token_id: int, num_top: int) -> TokenLogprob:
    top = []
    if num_top > 0:
        values, ids = row_logprobs.topk(num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token_id, logprob=float(row_logprobs[token_id]), top=top)


def _block_early_stop(logits: Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> Tensor:
    """Until min_tokens are out, EOS and stop tokens cannot be drawn."""
    rows = [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        params = seqs[i].params
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        logits[i, list(banned)] = float("-inf")
    return logits


# Dividing float32 logits by a temperature past float32's range divides by inf, and a banned
# token's -inf (min_tokens) becomes NaN. Above this cap every distribution is already uniform
# over the tokens allowed (logits differ by far less than the cap), so capping changes nothing else.
MAX_TEMPERATURE = 1e6


def _draw(row: Tensor, seq: Sequence) -> int:
    p = seq.params
    row = row / min(p.temperature, MAX_TEMPERATURE)
    if p.top_k > 0:
        kth = row.topk(min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = row.softmax(-1)
    if p.seed is not None and seq.generator is None:
        seq.generator = torch.Generator(device=row.device).manual_seed(p.seed)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
