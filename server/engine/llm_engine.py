"""The engine core: accepts requests, runs scheduler -> model runner -> sampler steps, and reports
each request's progress. Single-threaded; `AsyncLLMEngine` runs it in a background thread and `LLM`
drives it synchronously."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from torch.profiler import record_function

from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.model_runner import ModelRunner
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampler import sample, token_logprob
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledSeq, Scheduler
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)
MAX_DEFAULT_MODEL_LEN = 8192


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use
    num_blocks_total: int
    num_blocks_free: int
    block_size: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    kv_bytes_in_use: int
    compression_ratio: float
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    # Most running at once in one step since the current busy period began (Scheduler.peak_running).
    # Last and defaulted (0: nothing has run yet) so that EngineStats built elsewhere stay valid.
    num_running_peak: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None) -> None:
        self.config = config
        self.runner = ModelRunner(config, model, tokenizer)
        self.tokenizer = self.runner.tokenizer
        hf = self.runner.hf_config
        self.max_model_len = config.max_model_len or min(hf.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
        self.blocks = self.runner.allocate_kv_cache(config.max_num_seqs * self.max_model_len)
        self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = self._eos_ids()
        self.seqs: dict[str, Sequence] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _eos_ids(self) -> set[int]:
        ids = getattr(self.runner.model.generation_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # -- requests ---------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        vocab = self.runner.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Queue a request; ValueError (nothing queued) if it can never be served."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        self._check_fits(len(ids), params.max_tokens)
        seq = Sequence(request_id, ids, params, IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens))
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def _check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise ValueError("prompt is empty")
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the maximum "
                f"model length of {self.max_model_len} tokens"
            )
        if total > self.kv_capacity_tokens:
            raise ValueError(f"request needs {total} tokens of KV cache; the whole cache holds {self.kv_capacity_tokens}")

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self._finish(seq, reason)
        seq.error = error
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        with record_function("engine.schedule"):
            batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.time()
        for item in batch:
            item.seq.times.first_scheduled = item.seq.times.first_scheduled or now
        try:
            with record_function("engine.prepare"):
                ids, positions, meta = self.runner.prepare(batch, self.blocks.block_size)
            with record_function("engine.forward"):
                hidden = self.runner.forward(ids, positions, meta)
        except Exception as exc:  # noqa: BLE001 - the batch cannot be attributed further; fail it, keep serving
            log.exception("model step failed")
            return [self.abort(i.seq.request_id, "error", f"engine step failed: {exc}") for i in batch]
        with record_function("engine.sample_and_output"):
            return self._advance(batch, hidden)

    def _advance(self, batch: list[ScheduledSeq], hidden) -> list[RequestOutput]:
        """Record progress, sample for sequences whose tokens are all computed, report them."""
        ready, rows, row = [], [], 0
        for item in batch:
            seq = item.seq
            if seq.wants_prompt_logprobs:
                self._record_prompt_logprobs(seq, hidden[row : row + item.num_tokens])
            if seq.num_computed_tokens == 0:
                self.prompt_tokens_total += len(seq.prompt_token_ids) if not seq.num_preemptions else 0
            seq.num_computed_tokens += item.num_tokens
            row += item.num_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                ready.append(seq)
                rows.append(row - 1)
        if not ready:
            return []
        tokens, records = sample(self.runner.logits(hidden[rows]), ready, self.eos_token_ids)
        outputs = []
        for seq, token, record in zip(ready, tokens, records):
            try:
                self._append(seq, token, record)
                outputs.append(self._output(seq))
            except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer failure: fail this request only
                log.exception("request %s failed", seq.request_id)
                outputs.append(self.abort(seq.request_id, "error", f"request failed: {exc}"))
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, hidden) -> None:
        """Log-probabilities of the prompt tokens predicted from this chunk's positions."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # the first token has no context
        logprobs = self.runner.logits(hidden).log_softmax(-1)
        start = seq.num_computed_tokens
        for j in range(hidden.shape[0]):
            target = start + j + 1
            if target == len(seq.prompt_logprobs) and target < len(seq.prompt_token_ids):
                tok = seq.prompt_token_ids[target]
                seq.prompt_logprobs.append(token_logprob(logprobs[j], tok, seq.params.prompt_logprobs))

    def _append(self, seq: Sequence, token: int, record: TokenLogprob | None) -> None:
        now = time.time()
        seq.output_token_ids.append(token)
        if record is not None:
            seq.logprobs.append(record)
        seq.times.first_token = seq.times.first_token or now
        seq.times.last_token = now
        self.generation_tokens_total += 1
        if seq.params.detokenize:
            seq.text += seq.detokenizer.push(token)
        reason, stop = self._stop_reason(seq, token)
        if reason:
            seq.stop_reason = stop
            self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str | None, str | int | None]:
        p, n = seq.params, len(seq.output_token_ids)
        if n >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if token in self.eos_token_ids and not p.ignore_eos:
                return "stop", None
            for stop in p.stop:
                at = seq.text.find(stop)
                if at != -1:
                    seq.text = seq.text[:at]
                    return "stop", stop
        if n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        seq.times.finished = time.time()
        del self.seqs[seq.request_id]

    def _output(self, seq: Sequence) -> RequestOutput:
        """What is new for this request since its previous output. While running, the tail that could
        still turn out to be the start of a stop string is held back."""
        hold = 0 if seq.is_finished else max((len(s) - 1 for s in seq.params.stop), default=0)
        upto = max(seq.emitted_text_len, len(seq.text) - hold)
        delta_text = seq.text[seq.emitted_text_len : upto]
        delta_ids = seq.output_token_ids[seq.emitted_token_len :]
        seq.emitted_text_len, seq.emitted_token_len = upto, len(seq.output_token_ids)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.text[:upto],
            delta_text=delta_text,
            token_ids=list(seq.output_token_ids),
            delta_token_ids=delta_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            error=seq.error,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs,
            times=seq.times,
            num_preemptions=seq.num_preemptions,
        )

    # -- numbers for metrics ----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        used = self.blocks.num_used_blocks
        per_token = self.runner.cache_size.bytes_per_token
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_running_peak=self.scheduler.peak_running,
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=used / self.blocks.num_blocks,
            num_blocks_total=self.blocks.num_blocks,
            num_blocks_free=self.blocks.num_free_blocks,
            block_size=self.blocks.block_size,
            kv_bytes_per_token=per_token,
            kv_capacity_tokens=self.kv_capacity_tokens,
            kv_bytes_in_use=used * self.blocks.block_size * per_token,
            compression_ratio=self.config.compression_ratio,
            num_preemptions_total=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )
