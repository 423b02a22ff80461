"""Turns each sequence's next-token logits into a token (greedy, temperature, top-k, top-p) and its
log-probabilities. Seeded requests draw from their own generator, so a seed reproduces a sample
whatever else is in the batch. A row that fails (bad numbers in its logits, say) fails alone."""
from __future__ import annotations

import torch
from torch import Tensor

from server.engine.outputs import TokenLogprob
from server.engine.step import SeqWork


def sample(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None],
           eos_token_ids: set[int]) -> tuple[list[int], list[TokenLogprob | None], dict[int, str]]:
    """logits [B, V] (float32) for `work` in order -> (token ids, log-probability records, row -> why it failed)."""
    want = [w.params.logprobs is not None for w in work]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want) else None  # skipped on the common path
    logits = _block_early_stop(logits, work, eos_token_ids)
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows are done; the others are drawn below
    failures: dict[int, str] = {}
    records: list[TokenLogprob | None] = [None] * len(work)
    for i, w in enumerate(work):
        try:
            if not w.params.greedy:
                tokens[i] = _draw(logits[i], w, generators[i])
            if want[i]:
                records[i] = token_logprob(logprobs[i], tokens[i], w.params.logprobs)
        except Exception as exc:  # noqa: BLE001 - one request's sampling must not fail the batch
            failures[i] = f"sampling failed: {exc}"
    return tokens, records, failures


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
    row = row / p.temperature
    if p.top_k > 0:
        kth = row.topk(min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest set reaching top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(row.softmax(-1), 1, generator=generator))
