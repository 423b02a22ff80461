"""Presence, frequency and repetition penalties, kept on the device.

A penalised request gets two [vocab] tensors on the device: how often each token was generated,
and which tokens its prompt holds. The counts are bumped from the sampled tokens on the device, so
the step launched before the previous one's tokens reach the host (async scheduling) still sees
them. Applied to a row's logits before sampling, in vLLM's order:

    repetition: seen = prompt | generated; logit / r where positive, logit * r where not
    frequency, presence: logit - frequency * count - presence * (count > 0)

Requests without penalties cost nothing here. The state lives until the request finishes (a
preempted request keeps its counts: its recomputation does not sample them again).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.step import SeqWork
from server.transfer import to_device


@dataclass
class _Row:
    counts: Tensor  # [V] int32: times each token was generated
    in_prompt: Tensor  # [V] bool


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self._rows: dict[str, _Row] = {}

    def see_prompt(self, work: list[SeqWork]) -> None:
        """Mark the prompt tokens this step computes (a chunked prompt arrives over several steps)."""
        for w in work:
            if w.start >= w.num_prompt_tokens or not w.params.penalized:  # decode rows leave at once
                continue
            row = self._rows.get(w.request_id)
            if row is None:
                row = self._rows[w.request_id] = _Row(
                    torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device),
                    torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device))
            prompt = w.cached_prompt_ids + w.token_ids[:max(0, w.num_prompt_tokens - w.start)]
            if prompt:
                row.in_prompt[to_device(prompt, self.device, torch.long)] = True

    def apply(self, logits: Tensor, work: list[SeqWork]) -> Tensor:
        """logits [B, V] with each penalised row's penalties applied (a new tensor if any are)."""
        if not self._rows:  # the common case: nothing to do, and no per-row look-ups on the step's path
            return logits
        rows = [i for i, w in enumerate(work) if w.request_id in self._rows]
        if not rows:
            return logits
        logits = logits.clone()
        index = to_device(rows, logits.device, torch.long)
        counts = torch.stack([self._rows[work[i].request_id].counts for i in rows]).to(logits.dtype)
        in_prompt = torch.stack([self._rows[work[i].request_id].in_prompt for i in rows])
        params = [work[i].params for i in rows]
        rep = to_device([p.repetition_penalty for p in params], logits.device, logits.dtype)[:, None]
        freq = to_device([p.frequency_penalty for p in params], logits.device, logits.dtype)[:, None]
        pres = to_device([p.presence_penalty for p in params], logits.device, logits.dtype)[:, None]
        picked = logits[index]
        seen = in_prompt | (counts > 0)
        picked = torch.where(seen, torch.where(picked > 0, picked / rep, picked * rep), picked)
        picked = picked - freq * counts - pres * (counts > 0).to(logits.dtype)
        logits[index] = picked
        return logits

    def record(self, tokens: Tensor, work: list[SeqWork]) -> None:
        """Count this step's sampled tokens [B] (on the device) for the penalised rows."""
        if not self._rows:
            return
        for i, w in enumerate(work):
            row = self._rows.get(w.request_id)
            if row is not None:
                row.counts.index_add_(0, tokens[i:i + 1], torch.ones(1, dtype=torch.int32, device=tokens.device))

    def release(self, request_id: str) -> None:
        self._rows.pop(request_id, None)
