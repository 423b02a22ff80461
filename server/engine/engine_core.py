"""The engine core: scheduler -> model runner -> token bookkeeping, one step at a time.

It knows tokens, not text: a request finishes here on a stop token, EOS, max_tokens or the model
length; stop strings (which need the text) are found by the output processor, which then finishes
the request through `finish`. Single-threaded; `LLMEngine` drives it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from torch.profiler import record_function

from server.engine import faults
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.model_runner import ModelRunner, ModelSource
from server.engine.outputs import RequestTimes, TokenLogprob
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.step import StepPlan, StepResult

log = logging.getLogger(__name__)
# A model step that fails this many times in a row is not one bad batch but a broken engine (a
# sticky device error, say): the step raises, the engine loop dies, and the process exits so that
# its supervisor restarts it, instead of failing every request while /health says ok.
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass(slots=True)
class CoreOutput:
    """What one step did for one request (deltas since its previous output)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # all of them, once complete
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None
    error: str | None = None
    times: RequestTimes | None = None
    num_preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    num_running: int
    num_running_peak: int  # most running at once in one step since the current busy period began
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use
    num_blocks_total: int
    num_blocks_free: int
    block_size: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    kv_bytes_in_use: int
    compression_ratio: float  # what the loaded splices hold
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int


class EngineCore:
    def __init__(self, config: EngineConfig, max_model_len: int, source: ModelSource,
                 eos_token_ids: set[int]) -> None:
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.runner = ModelRunner(config, max_model_len, source, eos_token_ids)
        self.layout = self.runner.layout
        num_blocks = self.runner.num_blocks_for_budget()
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_decode_graphs()
        self.blocks = BlockManager(num_blocks, self.layout.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._consecutive_step_failures = 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def add(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def finish(self, request_id: str, reason: str, error: str | None = None,
               stop_reason: str | int | None = None) -> CoreOutput | None:
        """End a request wherever it is (abort, error, a stop string); None if it already ended."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason, seq.error, seq.stop_reason = reason, error, stop_reason
        seq.times.finished = time.time()
        return self._output(seq, [], [])

    # -- one step ---------------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        with record_function("engine.schedule"):
            plan = self.scheduler.schedule()
        if not plan.work:
            self.runner.release(plan)  # requests that ended since the last step give their rows back
            return []
        now = time.time()
        for w in plan.work:
            times = self.seqs[w.request_id].times
            times.first_scheduled = times.first_scheduled or now
        try:
            for w in plan.work:
                faults.check("forward", w.params.seed)
            with record_function("engine.execute"):
                result = self.runner.execute(plan)
        except Exception as exc:  # noqa: BLE001 - the batch cannot be attributed further; fail it, keep serving
            return self._fail_step(plan, exc)
        self._consecutive_step_failures = 0
        with record_function("engine.update"):
            return self._update(plan, result)

    def _fail_step(self, plan: StepPlan, exc: Exception) -> list[CoreOutput]:
        """Fail every request of a step whose model forward failed. Their blocks are freed, so what
        the step half-wrote into the cache belongs to nobody; the next step starts clean."""
        self._consecutive_step_failures += 1
        log.error("model step failed (%d in a row), failing its %d requests", self._consecutive_step_failures,
                  len(plan.work), exc_info=exc)
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        outputs = [out for w in plan.work if (out := self.finish(w.request_id, "error", message))]
        if self._consecutive_step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise RuntimeError(f"{self._consecutive_step_failures} model steps failed in a row; last: {exc}") from exc
        return outputs

    def _update(self, plan: StepPlan, result: StepResult) -> list[CoreOutput]:
        for w in plan.work:
            seq = self.seqs[w.request_id]
            if w.start == 0 and not seq.num_preemptions:
                self.prompt_tokens_total += seq.num_prompt_tokens
            seq.num_computed_tokens = w.end
            if w.request_id in result.prompt_logprobs:
                self._record_prompt_logprobs(seq, w.start, result.prompt_logprobs[w.request_id])
        outputs = []
        for request_id, why in result.failed.items():
            log.warning("request %s failed: %s", request_id, why)
            if out := self.finish(request_id, "error", why):
                outputs.append(out)
        now = time.time()
        for s in result.sampled:
            seq = self.seqs[s.request_id]
            seq.token_ids.append(s.token_id)
            seq.times.first_token = seq.times.first_token or now
            seq.times.last_token = now
            self.generation_tokens_total += 1
            new_logprobs = [s.logprob] if s.logprob is not None else []
            seq.logprobs.extend(new_logprobs)
            reason, stop = self._stop_reason(seq, s.token_id)
            if reason:
                out = self.finish(s.request_id, reason, stop_reason=stop)
                out.new_token_ids, out.new_logprobs = [s.token_id], new_logprobs
            else:
                out = self._output(seq, [s.token_id], new_logprobs)
            outputs.append(out)
        return outputs

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, start: int, records: list[TokenLogprob]) -> None:
        """records[j] scores prompt token start + 1 + j; keep only those not recorded yet (a
        sequence recomputed after preemption scores its prompt again)."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # the first token has no context
        for j, record in enumerate(records):
            if start + 1 + j == len(seq.prompt_logprobs):
                seq.prompt_logprobs.append(record)

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        p, n = seq.params, seq.num_output_tokens
        if n >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if token in self.eos_token_ids and not p.ignore_eos:
                return "stop", None
        if n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _output(self, seq: Sequence, new_ids: list[int], new_logprobs: list[TokenLogprob]) -> CoreOutput:
        prompt_done = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) >= seq.num_prompt_tokens
        return CoreOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_logprobs=new_logprobs,
            prompt_logprobs=seq.prompt_logprobs if prompt_done else None, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, error=seq.error, times=seq.times, num_preemptions=seq.num_preemptions,
        )

    # -- numbers for metrics ----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        used = self.blocks.num_used_blocks
        lay = self.layout
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_running_peak=self.scheduler.peak_running,
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=used / self.blocks.num_blocks,
            num_blocks_total=self.blocks.num_blocks,
            num_blocks_free=self.blocks.num_free_blocks,
            block_size=lay.block_size,
            kv_bytes_per_token=lay.bytes_per_token,
            kv_capacity_tokens=self.kv_capacity_tokens,
            kv_bytes_in_use=used * lay.block_size * lay.bytes_per_token,
            compression_ratio=lay.compression_ratio,
            num_preemptions_total=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )
