"""Turns each sequence's next-token logits into a token (greedy, temperature, top-k, top-p) and its
log-probabilities. Seeded requests draw from their own generator, so a seed reproduces a sample
whatever else is in the batch.

Each row is sampled on its own terms: a row that cannot be sampled (NaN logits, a draw that
fails) is reported in the failures and the other rows keep their tokens. If a batch-wide operation
fails, the batch is redone row by row so that only the row at fault fails.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from server.engine import faults
from server.engine.outputs import TokenLogprob
from server.engine.step import SeqWork

log = logging.getLogger(__name__)
FAILED = -1  # the token of a row that could not be sampled
# Dividing float32 logits by a temperature past float32's range divides by inf, and a banned
# token's -inf (min_tokens) becomes NaN. Above this cap every distribution is already uniform
# over the tokens allowed (logits differ by far less than the cap), so capping changes nothing else.
MAX_TEMPERATURE = 1e6

Samples = tuple[list[int], list[TokenLogprob | None], dict[int, str]]


def sample(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None],
           eos_token_ids: set[int]) -> Samples:
    """logits [B, V] (float32) for `work` in order -> (token ids, log-probability records,
    row -> why it could not be sampled)."""
    try:
        return _sample_batch(logits, work, generators, eos_token_ids)
    except Exception:  # noqa: BLE001 - a batch-wide op failed: find the row at fault by going one by one
        log.warning("batched sampling failed; sampling %d rows one by one", len(work), exc_info=True)
        tokens, records, failures = [], [], {}
        for i, w in enumerate(work):
            try:
                (token,), (record,), failed = _sample_batch(logits[i:i + 1], [w], generators[i:i + 1], eos_token_ids)
            except Exception as exc:  # noqa: BLE001 - this row alone fails
                token, record, failed = FAILED, None, {0: _why(exc)}
            tokens.append(token)
            records.append(record)
            if failed:
                failures[i] = failed[0]
        return tokens, records, failures


def _sample_batch(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None],
                  eos_token_ids: set[int]) -> Samples:
    want = [w.params.logprobs is not None for w in work]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want) else None  # skipped on the common path
    logits = _block_early_stop(logits, work, eos_token_ids)
    greedy, broken = logits.argmax(dim=-1), logits.isnan().any(dim=-1)  # -inf (banned) is fine, NaN is not
    tokens, broken = greedy.tolist(), broken.tolist()  # the step's one device sync
    records: list[TokenLogprob | None] = [None] * len(work)
    failures: dict[int, str] = {}
    for i, w in enumerate(work):
        try:
            if broken[i]:
                raise FloatingPointError("the model produced NaN logits for this sequence")
            faults.check("sample", w.params.seed)
            if not w.params.greedy:
                tokens[i] = _draw(logits[i], w, generators[i])
            if want[i]:
                records[i] = token_logprob(logprobs[i], tokens[i], w.params.logprobs)
        except Exception as exc:  # noqa: BLE001 - one row's failure is that request's, not the batch's
            tokens[i], failures[i] = FAILED, _why(exc)
    return tokens, records, failures


def _why(exc: Exception) -> str:
    return f"sampling failed: {type(exc).__name__}: {exc}"


def token_logprob(row_logprobs: Tensor, token_id: int, num_top: int) -> TokenLogprob:
    top = []
    if num_top > 0:
        values, ids = row_logprobs.topk(num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token_id, logprob=float(row_logprobs[token_id]), top=top)


def _block_early_stop(logits: Tensor, work: list[SeqWork], eos_token_ids: set[int]) -> Tensor:
    """Until min_tokens are out, EOS and stop tokens cannot be drawn."""
    rows = [i for i, w in enumerate(work) if w.num_output_tokens < w.params.min_tokens]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        params = work[i].params
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        logits[i, list(banned)] = float("-inf")
    return logits


def _draw(row: Tensor, w: SeqWork, generator: torch.Generator | None) -> int:
    p = w.params
    row = row / min(p.temperature, MAX_TEMPERATURE)
    if p.top_k > 0:
        kth = row.topk(min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest set reaching top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(row.softmax(-1), 1, generator=generator))
