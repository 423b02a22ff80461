"""Turns each sequence's next-token logits into a token (greedy, temperature, top-k, top-p) and its
log-probabilities. Seeded requests draw from their own generator, so a seed reproduces a sample
whatever else is in the batch.

Sampling is split in two so that the engine can schedule the next step while this one runs:
`enqueue` issues the whole batch's device work (no host sync: random rows draw by the
exponential race, argmax of p / E with E ~ Exp(1), which picks token i with probability p_i) and
starts the copies back; `PendingSamples.collect` waits for them and builds the Python results.

Each row is sampled on its own terms: a row that cannot be sampled (NaN logits, a draw that
fails) is reported in the failures and the other rows keep their tokens. If a batch-wide operation
fails, the batch is redone row by row so that only the row at fault fails.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine import faults
from server.engine.outputs import TokenLogprob
from server.engine.step import SeqWork
from server.transfer import to_device

log = logging.getLogger(__name__)
FAILED = -1  # the token of a row that could not be sampled
# Dividing float32 logits by a temperature past float32's range divides by inf, and a banned
# token's -inf (min_tokens) becomes NaN. Above this cap every distribution is already uniform
# over the tokens allowed (logits differ by far less than the cap), so capping changes nothing else.
MAX_TEMPERATURE = 1e6
# An exponential draw of exactly 0 would make p / E infinite (or NaN for a banned token's p = 0).
MIN_NOISE = 1e-20

Samples = tuple[list[int], list[TokenLogprob | None], dict[int, str]]
# Changes a batch's logits before sampling, after their log-probabilities are taken (penalties).
Adjust = Callable[[Tensor, list[SeqWork]], Tensor]


@dataclass
class PendingSamples:
    """One batch's sampling in flight: device results and their host copies (pinned on CUDA)."""

    work: list[SeqWork]
    tokens: Tensor  # [B] int64 on the device: what the next step reads as its input ids
    host: dict[str, Tensor]  # tokens, broken; logprob, top_ids, top_logprobs when asked for
    done: torch.cuda.Event | None  # recorded after the copies (None on the CPU: already done)

    def collect(self) -> Samples:
        """Wait for the copies and build (token ids, log-probability records, row -> why it failed)."""
        if self.done is not None:
            self.done.synchronize()
        tokens, broken = self.host["tokens"].tolist(), self.host["broken"].tolist()
        records: list[TokenLogprob | None] = [None] * len(self.work)
        failures: dict[int, str] = {}
        for i, w in enumerate(self.work):
            try:
                if broken[i]:
                    raise FloatingPointError("the model produced NaN logits for this sequence")
                faults.check("sample", w.params.seed)
                if w.params.logprobs is not None:
                    records[i] = self._record(i, tokens[i], w.params.logprobs)
            except Exception as exc:  # noqa: BLE001 - one row's failure is that request's, not the batch's
                tokens[i], failures[i] = FAILED, _why(exc)
        return tokens, records, failures

    def _record(self, i: int, token_id: int, num_top: int) -> TokenLogprob:
        ids, values = self.host["top_ids"][i, :num_top].tolist(), self.host["top_logprobs"][i, :num_top].tolist()
        return TokenLogprob(token_id=token_id, logprob=float(self.host["logprob"][i]), top=list(zip(ids, values)))


@dataclass
class ReadySamples:
    """A batch sampled on the host already (the row-by-row fallback), with the same interface."""

    work: list[SeqWork]
    tokens: Tensor  # failed rows hold token 0: a next step that reads them is discarded anyway
    samples: Samples

    def collect(self) -> Samples:
        return self.samples


def sample(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None],
           eos_token_ids: set[int]) -> Samples:
    """logits [B, V] (float32) for `work` in order -> (token ids, log-probability records,
    row -> why it could not be sampled), synchronously."""
    return start_sampling(logits, work, generators, eos_token_ids).collect()


def start_sampling(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None],
                   eos_token_ids: set[int], adjust: Adjust | None = None) -> PendingSamples | ReadySamples:
    """The batch's sampling issued on the device; if a batch-wide op fails, sampled row by row now."""
    try:
        return enqueue(logits, work, generators, eos_token_ids, adjust)
    except Exception:  # noqa: BLE001 - find the row at fault by going one by one
        return sample_rows(logits, work, generators, eos_token_ids, adjust)


def sample_rows(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None],
                eos_token_ids: set[int], adjust: Adjust | None = None) -> ReadySamples:
    """Every row on its own, so that an exception fails only its row (synchronous)."""
    log.warning("batched sampling failed; sampling %d rows one by one", len(work), exc_info=True)
    tokens, records, failures = [], [], {}
    for i, w in enumerate(work):
        try:
            (token,), (record,), failed = enqueue(logits[i:i + 1], [w], generators[i:i + 1], eos_token_ids,
                                                  adjust).collect()
        except Exception as exc:  # noqa: BLE001 - this row alone fails
            token, record, failed = FAILED, None, {0: _why(exc)}
        tokens.append(token)
        records.append(record)
        if failed:
            failures[i] = failed[0]
    on_device = torch.tensor([max(t, 0) for t in tokens], dtype=torch.long).to(logits.device)
    return ReadySamples(work, on_device, (tokens, records, failures))


def enqueue(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None],
            eos_token_ids: set[int], adjust: Adjust | None = None) -> PendingSamples:
    """Issue the batch's sampling on the device; nothing here waits for the device. Log-probabilities
    are the model's own: taken before `adjust`, logit_bias and min_tokens change the logits."""
    num_top = max((w.params.logprobs for w in work if w.params.logprobs is not None), default=None)
    logprobs = torch.log_softmax(logits, dim=-1) if num_top is not None else None  # skipped on the common path
    if adjust is not None:
        logits = adjust(logits, work)
    logits = _adjust_logits(logits, work, eos_token_ids)
    tokens = logits.argmax(dim=-1)
    random = [i for i, w in enumerate(work) if not w.params.greedy]
    if random:
        index = to_device(random, logits.device, torch.long)
        tokens[index] = _draw(logits[index], [work[i] for i in random], [generators[i] for i in random])
    device = {"tokens": tokens, "broken": logits.isnan().any(dim=-1)}  # -inf (banned) is fine, NaN is not
    if logprobs is not None:
        device["logprob"] = logprobs.gather(1, tokens[:, None])[:, 0]
        device["top_logprobs"], device["top_ids"] = logprobs.topk(num_top, dim=-1)
    host, done = _copy_to_host(device)
    return PendingSamples(work, tokens, host, done)


def _copy_to_host(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], torch.cuda.Event | None]:
    if tensors["tokens"].device.type != "cuda":
        return tensors, None
    host = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for k, t in tensors.items()}
    done = torch.cuda.Event()
    done.record()
    return host, done


def _why(exc: Exception) -> str:
    return f"sampling failed: {type(exc).__name__}: {exc}"


def _adjust_logits(logits: Tensor, work: list[SeqWork], eos_token_ids: set[int]) -> Tensor:
    """Each row's logit_bias added; until min_tokens are out, EOS and stop tokens cannot be drawn."""
    biased = [i for i, w in enumerate(work) if w.params.logit_bias]
    held = [i for i, w in enumerate(work) if w.num_output_tokens < w.params.min_tokens]
    if not biased and not held:
        return logits
    logits = logits.clone()
    for i in biased:
        bias = work[i].params.logit_bias
        ids = to_device(list(bias), logits.device, torch.long)
        logits[i, ids] += to_device(list(bias.values()), logits.device, logits.dtype)
    for i in held:
        params = work[i].params
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        if banned:
            logits[i, to_device(sorted(banned), logits.device, torch.long)] = float("-inf")
    return logits


def _draw(logits: Tensor, work: list[SeqWork], generators: list[torch.Generator | None]) -> Tensor:
    """One token per row [R, V]: temperature, then top-k, then top-p, then the exponential race."""
    device = logits.device
    temperature = to_device([min(w.params.temperature, MAX_TEMPERATURE) for w in work], device, logits.dtype)
    logits = logits / temperature[:, None]
    if any(w.params.top_k > 0 or w.params.top_p < 1.0 for w in work):
        logits = _top_k_top_p(logits, work)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for j, g in enumerate(generators):
        if g is not None:  # a seeded row: its own stream of draws, whatever the batch
            noise[j].exponential_(generator=g)
    return (probs / noise.clamp_min_(MIN_NOISE)).argmax(dim=-1)


def _top_k_top_p(logits: Tensor, work: list[SeqWork]) -> Tensor:
    """Keep each row's top_k best, then the smallest set of those reaching top_p; the rest -inf."""
    vocab, device = logits.shape[-1], logits.device
    top_k = to_device([w.params.top_k if w.params.top_k > 0 else vocab for w in work], device, torch.long)
    top_p = to_device([w.params.top_p for w in work], device, logits.dtype)
    ranked, order = logits.sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(torch.arange(vocab, device=device)[None, :] >= top_k[:, None], float("-inf"))
    probs = ranked.softmax(dim=-1)
    ranked = ranked.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, ranked)
