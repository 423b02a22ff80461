"""The engine core: scheduler -> model runner -> token bookkeeping, one step at a time.

It knows tokens, not text: a request finishes here on a stop token, EOS, max_tokens or the model
length; stop strings (which need the text) are found by the output processor, which then finishes
the request through `finish`. Single-threaded; `LLMEngine` drives it.

Async scheduling (vLLM v1's, on by default): a step is scheduled and launched before the previous
one's tokens are back, so the host's work (scheduling, inputs, bookkeeping, outputs) overlaps the
GPU's. Each sequence sampled by the step in flight carries a placeholder token; the runner fills it
on the device, and the step after reads the real token. A request that stops on a sampled token
(EOS, a stop token) has had one more token computed, which is dropped; one that stops on its
length is not scheduled again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from torch.profiler import record_function

from server.engine import faults
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.iteration_stats import IterationTokens
from server.engine.model_runner import ModelRunner, ModelSource
from server.engine.outputs import RequestTimes, TokenLogprob
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.model_runner import PendingStep
from server.engine.step import PLACEHOLDER_TOKEN, StepPlan, StepResult
from server.parallel.rendezvous import rank_config, torchrun_rank
from server.parallel.shards import check_shardable
from server.parallel.workers import Workers

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
    kv_cache_dtype: str  # auto, bf16, fp8, fp8_e4m3, fp8_e5m2 (as configured)
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries_total: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int  # of which were cached
    iteration_tokens: IterationTokens  # tokens per step (a copy: the engine's own keeps counting)


@dataclass
class InFlight:
    """A launched step whose tokens are not back yet."""

    plan: StepPlan
    pending: PendingStep
    sampled: dict[str, tuple[Sequence, int]]  # request -> (its sequence, where its new token goes)


class EngineCore:
    def __init__(self, config: EngineConfig, max_model_len: int, source: ModelSource,
                 eos_token_ids: set[int], workers: Workers | None = None) -> None:
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.workers = workers or start_workers(config, max_model_len, source)
        try:
            num_blocks = self._start_runner(config, max_model_len, source)
        except BaseException:
            if self.workers is not None:
                self.workers.abort()  # they may wait in a start-up collective this rank will not join
            raise
        self.blocks = BlockManager(num_blocks, self.layout.block_size, enable_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.iteration_tokens = IterationTokens()
        self._consecutive_step_failures = 0
        self.async_scheduling = config.async_scheduling
        self._in_flight: InFlight | None = None

    def _start_runner(self, config: EngineConfig, max_model_len: int, source: ModelSource) -> int:
        """Load this rank's model, size and allocate its cache, capture its graphs (every other rank
        does the same, in the same order); returns the cache's blocks."""
        if self.workers is None:
            self.runner = ModelRunner(config, max_model_len, source, self.eos_token_ids)
        else:
            self.runner = ModelRunner(rank_config(config, self.workers.local_rank), max_model_len, source,
                                      self.eos_token_ids, self.workers.tp_stages, self.workers.channel)
        self.layout = self.runner.layout
        num_blocks = self.runner.num_blocks_for_budget()
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_decode_graphs()
        return num_blocks

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one)."""
        if self.workers is not None:
            self.workers.stop()

    def add(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

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
        """Launch the next step, then collect the one before it (or this one, without async
        scheduling); the outputs are those of the step collected."""
        with record_function("engine.schedule"):
            plan = self.scheduler.schedule()
        outputs: list[CoreOutput] = []
        if plan.work:
            launched = self._launch(plan, outputs)
        else:
            launched = None
            self.runner.release(plan)  # requests that ended since the last step give their rows back
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs[:0] = self._collect(previous)
        if launched is not None and not self.async_scheduling:
            self._in_flight = None
            outputs.extend(self._collect(launched))
        return outputs

    def _launch(self, plan: StepPlan, outputs: list[CoreOutput]) -> InFlight | None:
        """Issue the plan on the device and advance its sequences past it; None (and its
        requests failed into `outputs`) if that failed."""
        now = time.time()
        for w in plan.work:
            times = self.seqs[w.request_id].times
            times.first_scheduled = times.first_scheduled or now
        try:
            for w in plan.work:
                faults.check("forward", w.params.seed)
            with record_function("engine.launch"):
                pending = self.runner.launch(plan)
        except Exception as exc:  # noqa: BLE001 - the batch cannot be attributed further; fail it, keep serving
            self._raise_if_ranks_diverged(exc)
            outputs.extend(self._fail_step(plan, exc))
            return None
        flight = InFlight(plan, pending, {})
        self.iteration_tokens.observe(plan.num_tokens)
        for w in plan.work:
            seq = self.seqs[w.request_id]
            if w.resumed and not seq.num_preemptions:  # admitted for the first time (its cached prefix counts too)
                self.prompt_tokens_total += seq.num_prompt_tokens
            seq.num_computed_tokens = w.end
            # Its full blocks are findable from now on: any step that reads them runs after this one.
            self.blocks.register(seq.block_table, seq.block_hashes, seq.token_ids, w.end, PLACEHOLDER_TOKEN)
            if w.request_id in pending.rows:
                flight.sampled[w.request_id] = (seq, seq.num_tokens)
                if not self._reaches_length(seq, seq.num_tokens + 1):
                    seq.token_ids.append(PLACEHOLDER_TOKEN)  # the next step computes on it
        return flight

    def _collect(self, flight: InFlight) -> list[CoreOutput]:
        try:
            with record_function("engine.collect"):
                result = self.runner.collect(flight.pending)
        except Exception as exc:  # noqa: BLE001 - a device error surfaces here: fail the step, keep serving
            self._raise_if_ranks_diverged(exc)
            return self._fail_step(flight.plan, exc)
        self._consecutive_step_failures = 0
        with record_function("engine.update"):
            return self._update(flight, result)

    def _raise_if_ranks_diverged(self, exc: Exception) -> None:
        """With other ranks, a step that failed here after they were sent it leaves them inside a
        collective this rank will not join: no later step can run, so the engine stops."""
        if self.runner.channel is not None and not isinstance(exc, faults.InjectedFault):
            raise RuntimeError(f"a tensor-parallel step failed on the first rank: {type(exc).__name__}: {exc}") from exc

    def _fail_step(self, plan: StepPlan, exc: Exception) -> list[CoreOutput]:
        """Fail every request of a step whose model forward failed. Their blocks are freed, so what
        the step half-wrote into the cache belongs to nobody; the next step starts clean."""
        self._consecutive_step_failures += 1
        self.blocks.reset_prefix_cache()  # what the step wrote cannot be trusted
        log.error("model step failed (%d in a row), failing its %d requests", self._consecutive_step_failures,
                  len(plan.work), exc_info=exc)
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        outputs = [out for w in plan.work if (out := self.finish(w.request_id, "error", message))]
        if self._consecutive_step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise RuntimeError(f"{self._consecutive_step_failures} model steps failed in a row; last: {exc}") from exc
        return outputs

    def _update(self, flight: InFlight, result: StepResult) -> list[CoreOutput]:
        for w in flight.plan.work:
            if w.request_id in result.prompt_logprobs and w.request_id in self.seqs:
                self._record_prompt_logprobs(self.seqs[w.request_id], w.start, result.prompt_logprobs[w.request_id])
        outputs = []
        for request_id, why in result.failed.items():
            log.warning("request %s failed: %s", request_id, why)
            if out := self.finish(request_id, "error", why):
                outputs.append(out)
        now = time.time()
        for s in result.sampled:
            seq, index = flight.sampled[s.request_id]
            if self.seqs.get(s.request_id) is not seq:
                continue  # finished or aborted while this step ran: its token is dropped
            if index == seq.num_tokens:
                seq.token_ids.append(s.token_id)  # its last token: no placeholder was kept for it
            else:
                seq.token_ids[index] = s.token_id
            seq.times.first_token = seq.times.first_token or now
            seq.times.last_token = now
            self.generation_tokens_total += 1
            new_logprobs = [s.logprob] if s.logprob is not None else []
            seq.logprobs.extend(new_logprobs)
            reason, stop = self._stop_reason(seq, s.token_id, index + 1)
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

    def _stop_reason(self, seq: Sequence, token: int, num_tokens: int) -> tuple[str | None, int | None]:
        """Whether `token`, the sequence's `num_tokens`-th, ends it (later placeholders not counted)."""
        p = seq.params
        if num_tokens - seq.num_prompt_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if token in self.eos_token_ids and not p.ignore_eos:
                return "stop", None
        if self._reaches_length(seq, num_tokens):
            return "length", None
        return None, None

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """A sequence of `num_tokens` tokens is done whatever they are (max_tokens, model length)."""
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.max_model_len

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
            kv_cache_dtype=lay.kv_cache_dtype,
            num_preemptions_total=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries_total=self.blocks.query_tokens,
            prefix_cache_hits_total=self.blocks.hit_tokens,
            iteration_tokens=self.iteration_tokens.snapshot(),
        )


def start_workers(config: EngineConfig, max_model_len: int, source: ModelSource) -> Workers | None:
    """The other tensor-parallel ranks: none with one rank, torchrun's when it started this
    process, else processes of this host started now."""
    if config.tensor_parallel_size == 1:
        return None
    check_shardable(source.config, config.tensor_parallel_size, config.enable_expert_parallel)  # before any process
    place = torchrun_rank()
    return Workers.torchrun(place, config) if place else Workers.spawn(config, max_model_len, source)
