"""Turns each sequence's next-token logits into a token (greedy, temperature, top-k, top-p) and its
log-probabilities. Seeded requests draw from their own generator, so a seed reproduces a sample
whatever else is in the batch."""
from __future__ import annotations

import torch
from torch import Tensor

from server.engine.outputs import TokenLogprob
from server.engine.sequence import Sequence


def sample(logits: Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] (float32) for `seqs` in order -> (token ids, log-probability records)."""
    want = [s.params.logprobs is not None for s in seqs]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want) else None  # skipped on the common path
    logits = _block_early_stop(logits, seqs, eos_token_ids)
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows are done; the others are redrawn below
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[i] = _draw(logits[i], seq)
    records = [
        token_logprob(logprobs[i], tok, seq.params.logprobs) if want[i] else None
        for i, (seq, tok) in enumerate(zip(seqs, tokens))
    ]
    return tokens, records


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


def _draw(row: Tensor, seq: Sequence) -> int:
    p = seq.params
    row = row / p.temperature
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
