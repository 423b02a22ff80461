"""Owns the model and its paged cache; turns a `StepPlan` into sampled tokens.

Start-up: read the config, choose devices, load the splices and derive the cache layout from them,
build the owned DeepSeek-V2 model and load its weights (folding the splices in), report how many
cache blocks the budget buys, allocate the cache, capture the decode CUDA graphs.

A step: the plan's tokens are flattened into one batch (numpy, no per-token Python), each
sequence's block-table row is updated from the plan's deltas, the attention backend builds the
step's metadata, the model runs (a CUDA-graph replay when every sequence decodes one token), and
the last row of every sequence that reached its end is sampled. `launch` issues all of that
without waiting for the device (a token the previous step is still sampling is read from that
step's output on the device); `collect` waits for a launched step and reads its tokens back.

Tensor parallel: one runner per rank, each with its shard of the model and a whole copy of the
cache. The first rank's runner (in the engine process) sends each plan down the `StepChannel`
before running it; the others `follow` it: the same block-table updates and the same forward (the
collectives meet inside it), their vocabulary slices of the logits, and the tokens the first rank
sampled, which every rank needs as the next step's inputs.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvsplice.cache_layout import CacheLayout, CacheViews
from kvsplice.model_source import BUILTIN_MODEL_DIR, load_config, resolve_model_path, shipped_config_name
from kvsplice.patch import make_splices
from kvsplice.splice import LearnedKVSplice
from kvsplice.storage import FINGERPRINT_WEIGHT, fingerprint, load_splices
from server.attention.backend import get_backend
from server.attention.metadata import AttentionMetadata, StepShape
from server.engine.config import EngineConfig
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.kv_budget import plan_num_blocks
from server.engine.placement import layers_per_device, split_layers, stage_devices
from server.engine.outputs import TokenLogprob
from server.engine.penalties import PenaltyState
from server.engine.sampler import PendingSamples, ReadySamples, start_sampling
from server.engine.step import PLACEHOLDER_TOKEN, Sampled, SeqWork, StepPlan, StepResult
from server.model.deepseek_v2 import DeepseekV2ForCausalLM
from server.model.loader import CheckpointWeights, RandomWeights, WeightSource, checkpoint_directory
from server.parallel.capacity import module_bytes
from server.parallel.channel import StepChannel
from server.parallel.group import SINGLE, TensorParallel
from server.parallel.shards import check_shardable
from server.transfer import to_device

log = logging.getLogger(__name__)
LOAD_FORMATS = ("auto", "dummy")


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N'; a CUDA device always with its index, so that devices compare equal."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


@dataclass
class ModelSource:
    """Where config, tokenizer and weights come from."""

    config: object
    tokenizer_dir: str
    weights_dir: str | None  # None: random weights (load_format="dummy")


def locate_model(config: EngineConfig) -> ModelSource:
    if config.load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {config.load_format!r}")
    if config.load_format == "dummy" and shipped_config_name(config.model):
        # A shipped public shape with random weights: no download; the built-in tokenizer supplies ids.
        return ModelSource(load_config(config.model), str(BUILTIN_MODEL_DIR), None)
    directory = checkpoint_directory(resolve_model_path(config.model), config.revision)
    hf_config = load_config(str(directory), trust_remote_code=config.trust_remote_code)
    weights = None if config.load_format == "dummy" else str(directory)
    return ModelSource(hf_config, str(directory), weights)


@dataclass
class PendingStep:
    """A launched step: its sampling in flight, and what already failed while issuing it."""

    samples: PendingSamples | ReadySamples | None = None
    rows: dict[str, int] = field(default_factory=dict)  # request -> its row in `tokens`
    prompt_logprobs: dict[str, Callable[[], list[TokenLogprob]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> Tensor | None:
        """The sampled tokens on the device."""
        return None if self.samples is None else self.samples.tokens


class ModelRunner:
    def __init__(self, config: EngineConfig, max_model_len: int, source: ModelSource,
                 eos_token_ids: set[int], tp_stages: Sequence[TensorParallel] = (SINGLE,),
                 channel: StepChannel | None = None) -> None:
        """`tp_stages`: the tensor-parallel group of each pipeline stage (one for all of them is
        enough without a layer split); `channel`: the plans' way from the first rank to the others."""
        self.config, self.max_model_len = config, max_model_len
        self.eos_token_ids = eos_token_ids  # min_tokens holds them back
        self.tp, self.channel = tp_stages[0], channel
        self.device = resolve_device(config.device)  # where a step's inputs start (the first GPU)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.kv_cache_dtype == "bf16" and self.dtype != torch.bfloat16:
            raise ValueError(f"kv_cache_dtype bf16 needs dtype bfloat16 (the model runs in {self.dtype}); the cache "
                             "holds the model dtype unless it is fp8: use auto, fp8 or fp8_e5m2")
        self.hf_config = source.config
        check_shardable(self.hf_config, self.tp.size, config.enable_expert_parallel)
        stages = stage_devices(self.device, config.pipeline_parallel_size)
        layer_stages = split_layers(self.hf_config.num_hidden_layers, list(range(len(stages))))
        self.layer_devices = [stages[s] for s in layer_stages]
        layer_tp = [tp_stages[s] if len(tp_stages) > 1 else tp_stages[0] for s in layer_stages]
        weights = self._weights(source)
        splices = self._splices(weights)
        self.layout = CacheLayout.for_splices(self.hf_config, splices, self.dtype, config.block_size,
                                              config.kv_cache_dtype)
        self.backend = get_backend(self.device, config.attention_backend)
        self.model = DeepseekV2ForCausalLM(self.hf_config, self.layout, self.backend, max_model_len, self.dtype,
                                           self.layer_devices, fused_moe=config.fused_moe,
                                           layer_tp=layer_tp, expert_parallel=config.enable_expert_parallel)
        self.model.load_weights(weights, splices)
        # Per layer: views of [num_blocks + 1, block_size, row_size]; the +1 is scratch.
        self.kv_caches: list[CacheViews] = []
        self.graphs: DecodeGraphs | None = None
        self._rows: dict[str, tuple[int, int]] = {}  # request -> (its row of the block table, blocks in it)
        self._free_rows: list[int] = []
        self._table = np.zeros((0, 0), dtype=np.int32)
        self._generators: dict[str, torch.Generator] = {}
        self.penalties = PenaltyState(self.hf_config.vocab_size, self.layer_devices[-1])  # where logits are
        # The latest launched step's sampled tokens on the device, and each request's row in them.
        self._last_tokens: Tensor | None = None
        self._last_rows: dict[str, int] = {}

    def _weights(self, source: ModelSource) -> WeightSource:
        if source.weights_dir is None:
            return RandomWeights(self.device, self.dtype, std=getattr(self.hf_config, "initializer_range", 0.02),
                                 seed=self.config.seed)
        return CheckpointWeights(source.weights_dir, self.device, self.dtype)

    def _splices(self, weights: WeightSource) -> list[LearnedKVSplice | None]:
        """Per-layer splices on each layer's device in float32 (folded into the weights at load)."""
        cfg, hf = self.config, self.hf_config
        if cfg.splice_file:
            kv_a = weights.get(FINGERPRINT_WEIGHT, (hf.kv_lora_rank + hf.qk_rope_head_dim, hf.hidden_size))
            splices = load_splices(cfg.splice_file, config=hf, model_fingerprint_value=fingerprint(hf, kv_a))
            wanted = splices[0].compression_ratio if cfg.compression_ratio is None else cfg.compression_ratio
            if abs(splices[0].compression_ratio - wanted) > 1e-9:
                raise ValueError(f"splice_file {cfg.splice_file} has compression_ratio "
                                 f"{splices[0].compression_ratio}, the engine is set to {cfg.compression_ratio}")
        elif cfg.compression_ratio in (None, 1.0):
            return [None] * hf.num_hidden_layers
        else:
            log.warning("compression_ratio %g without a splice file: the zero-shot %r splice costs quality (+54%% "
                        "perplexity at 0.5 on the built-in model, docs/quality.md); make one with `kvsplice "
                        "calibrate --model %s --compression-ratio %g --init pca --out FILE` and serve with "
                        "--splice-file FILE", cfg.compression_ratio, cfg.splice_init, cfg.model, cfg.compression_ratio)
            splices = make_splices(hf, cfg.compression_ratio, cfg.splice_init, seed=cfg.seed)
        return [s.to(device=d, dtype=torch.float32).eval() for s, d in zip(splices, self.layer_devices)]

    @property
    def weight_bytes(self) -> int:
        """What this rank's model holds (its shard, with tensor parallelism)."""
        return module_bytes(self.model)

    @property
    def multi_device(self) -> bool:
        return len(set(self.layer_devices)) > 1

    # -- start-up: the cache ----------------------------------------------------------------------

    def num_blocks_for_budget(self) -> int:
        """Cache blocks the KV budget buys on every device of every rank (the engine's block
        manager gets this many; every rank calls this at start-up)."""
        blocks = plan_num_blocks(self.config, self.layout, layers_per_device(self.layer_devices),
                                 self.config.max_num_seqs * self.max_model_len, self.hf_config)
        return blocks if self.channel is None else self.channel.agree_min(blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One tensor per device for its layers. One extra block that no sequence owns takes the
        writes of CUDA-graph padding rows."""
        lay = self.layout
        for device, n in layers_per_device(self.layer_devices).items():
            shape = (n, num_blocks + 1, lay.block_size, lay.row_size)
            layers = torch.zeros(shape, dtype=lay.storage_dtype, device=device).unbind(0)
            self.kv_caches.extend(lay.views(cache) for cache in layers)
        max_blocks = -(-self.max_model_len // lay.block_size)
        self._table = np.zeros((self.config.max_num_seqs, max_blocks), dtype=np.int32)
        self._free_rows = list(range(self.config.max_num_seqs - 1, -1, -1))

    def capture_decode_graphs(self) -> None:
        """On CUDA (unless disabled), capture the decode forward for batch sizes up to max_num_seqs."""
        if self.device.type != "cuda" or not self.config.cuda_graphs or self.multi_device:
            return  # a graph is captured on one device; a layer split runs eagerly
        scratch_block = self.kv_caches[0].num_blocks - 1
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, self.config.max_num_seqs,
                                   self.max_model_len, self.layout.block_size, scratch_block, self.device)

    # -- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Issue the step's device work (forward, logits, sampling, copies back) without waiting
        for it, so that the host can prepare the next step meanwhile. The first rank's call: the
        other ranks are sent the plan first."""
        if self.channel is not None:
            self.channel.send(plan)
        self._release(plan)
        self.penalties.see_prompt(plan.work)
        hidden = self._forward(plan.work)
        pending = self._enqueue_sampling(plan.work, hidden)
        self._last_tokens, self._last_rows = pending.tokens, pending.rows
        return pending

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """Another rank's share of a plan the first rank launched: the forward, this rank's logit
        slices, and the tokens the first rank sampled (the next step's inputs)."""
        self._release(plan)
        if not plan.work:
            return
        hidden = self._forward(plan.work)
        prompts, samples = logit_rows(plan.work)
        rows = _flat_rows(prompts, samples)
        if rows:
            self.model.compute_logits(hidden[to_device(np.array(rows), hidden.device)])
        if samples:
            tokens = torch.empty(len(samples), dtype=torch.long, device=self.layer_devices[-1])
            self._last_tokens = self.model.head_tp.broadcast_from_first(tokens)
            self._last_rows = {w.request_id: i for i, (w, _) in enumerate(samples)}

    def _forward(self, work: list[SeqWork]) -> Tensor:
        input_ids, positions, meta = self.prepare(work)
        if self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, self.kv_caches, meta)

    def collect(self, pending: PendingStep) -> StepResult:
        """Wait for a launched step and read its tokens back."""
        result = StepResult(failed=pending.failed)
        for request_id, records in pending.prompt_logprobs.items():
            result.prompt_logprobs[request_id] = records()
        if pending.samples is None:
            return result
        tokens, records, failures = pending.samples.collect()
        for i, w in enumerate(pending.samples.work):
            if i in failures:
                result.failed[w.request_id] = failures[i]
            else:
                result.sampled.append(Sampled(w.request_id, tokens[i], records[i]))
        return result

    def release(self, plan: StepPlan) -> None:
        """A plan with no work: its finished and preempted requests' rows are forgotten (on every rank)."""
        if self.channel is not None and (plan.preempted or plan.finished):
            self.channel.send(StepPlan([], plan.preempted, plan.finished))
        self._release(plan)

    def _release(self, plan: StepPlan) -> None:
        """Forget the block-table rows (and, when finished, the generators) of requests whose cache is gone."""
        for request_id in itertools.chain(plan.preempted, plan.finished):
            entry = self._rows.pop(request_id, None)
            if entry is not None:
                self._free_rows.append(entry[0])
        for request_id in plan.finished:
            self._generators.pop(request_id, None)
            self.penalties.release(request_id)

    def prepare(self, work: list[SeqWork]) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Flatten the scheduled tokens into (input_ids, positions, attention metadata)."""
        rows = np.array([self._update_row(w) for w in work], dtype=np.int64)
        query_lens = np.array([len(w.token_ids) for w in work], dtype=np.int64)
        starts = np.array([w.start for w in work], dtype=np.int64)
        context_lens = starts + query_lens
        token_seq = np.repeat(np.arange(len(work)), query_lens)  # which sequence each token belongs to
        offsets = np.arange(token_seq.size) - np.repeat(np.cumsum(query_lens) - query_lens, query_lens)
        positions = starts[token_seq] + offsets
        block_size = self.layout.block_size
        width = -(-int(context_lens.max()) // block_size)
        tables = self._table[rows, :width]
        slots = tables[token_seq, positions // block_size].astype(np.int64) * block_size + positions % block_size
        shape = StepShape(query_lens, context_lens, tables, slots)
        meta = self.backend.build_metadata(shape, self.device)
        ids = np.fromiter(itertools.chain.from_iterable(w.token_ids for w in work), dtype=np.int64,
                          count=token_seq.size)
        input_ids = to_device(ids, self.device)
        holes = np.flatnonzero(ids == PLACEHOLDER_TOKEN)
        if holes.size:
            self._fill_from_last_step(input_ids, holes, [work[i].request_id for i in token_seq[holes]])
        return input_ids, to_device(positions, self.device), meta

    def _fill_from_last_step(self, input_ids: Tensor, holes: np.ndarray, request_ids: list[str]) -> None:
        """Tokens the previous step is still sampling: copied on the device from its output, so
        this step is issued without waiting for them."""
        missing = [r for r in request_ids if r not in self._last_rows]
        if missing:
            raise RuntimeError(f"no token in flight for requests {missing}")
        src = to_device(np.array([self._last_rows[r] for r in request_ids], dtype=np.int64), self.device)
        dst = to_device(holes.astype(np.int64), self.device)
        input_ids[dst] = self._last_tokens.to(input_ids.device)[src.to(self._last_tokens.device)]

    def _update_row(self, w: SeqWork) -> int:
        """The sequence's block-table row, with this step's new blocks written in."""
        row, known = self._rows.get(w.request_id, (None, 0))
        if row is None:
            row = self._free_rows.pop()
        if w.resumed:
            known = 0
        self._table[row, known:known + len(w.new_blocks)] = w.new_blocks
        self._rows[w.request_id] = (row, known + len(w.new_blocks))
        return row

    def _enqueue_sampling(self, work: list[SeqWork], hidden: Tensor) -> PendingStep:
        """Everything that reads this step's hidden states is issued now: a graph replay's output
        buffer is overwritten by the next step. The logits of every row wanted (prompt scores and
        the rows to sample) come from one lm_head call, which tensor parallel makes a collective."""
        pending = PendingStep()
        prompts, samples = logit_rows(work)
        rows = _flat_rows(prompts, samples)
        if not rows:
            return pending
        try:
            logits = self.model.compute_logits(hidden[to_device(np.array(rows), hidden.device)])
        except Exception as exc:  # noqa: BLE001 - the lm_head is one batched op: its rows fail together
            if self.tp.size > 1:
                raise  # the other ranks are inside the same collective: nothing to isolate
            pending.failed.update({w.request_id: f"computing logits failed: {type(exc).__name__}: {exc}"
                                   for w in [w for w, _, _ in prompts] + [w for w, _ in samples]})
            return pending
        offset = 0
        for w, _, count in prompts:
            try:
                pending.prompt_logprobs[w.request_id] = self._prompt_logprobs(w, logits[offset:offset + count])
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                pending.failed[w.request_id] = f"prompt logprobs failed: {type(exc).__name__}: {exc}"
            offset += count
        if not samples:
            return pending
        # A request whose prompt scores failed is sampled anyway (every rank reads the same rows)
        # and finished with its failure.
        picked = [w for w, _ in samples]
        pending.samples = start_sampling(logits[offset:], picked, [self._generator(w) for w in picked],
                                         self.eos_token_ids, self.penalties.apply)
        self.penalties.record(pending.samples.tokens, picked)
        self.model.head_tp.broadcast_from_first(pending.samples.tokens)
        pending.rows = {w.request_id: i for i, w in enumerate(picked)}
        return pending

    def _prompt_logprobs(self, w: SeqWork, logits: Tensor) -> Callable[[], list[TokenLogprob]]:
        """Issued now; the returned function builds the records (it waits for the device)."""
        logprobs = logits.log_softmax(-1)
        targets = to_device(np.array(w.prompt_targets, dtype=np.int64), logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        top_values, top_ids = logprobs.topk(w.params.prompt_logprobs, dim=-1)

        def records() -> list[TokenLogprob]:
            values, ids, vals = chosen.tolist(), top_ids.tolist(), top_values.tolist()
            return [TokenLogprob(t, values[j], list(zip(ids[j], vals[j]))) for j, t in enumerate(w.prompt_targets)]
        return records

    def _generator(self, w: SeqWork) -> torch.Generator | None:
        """A seeded request's own generator (made on first use; it survives preemption)."""
        seed = w.params.seed
        if seed is None or w.params.greedy:
            return None
        if w.request_id not in self._generators:
            device = self.layer_devices[-1]
            self._generators[w.request_id] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[w.request_id]


PromptRows = list[tuple[SeqWork, int, int]]  # (work, first row in the step's hidden states, rows)
SampleRows = list[tuple[SeqWork, int]]  # (work, its last row)


def logit_rows(work: list[SeqWork]) -> tuple[PromptRows, SampleRows]:
    """The hidden-state rows whose logits a step needs, from the plan alone (so that every rank
    agrees): each prompt-scoring sequence's rows, and the last row of each sequence to sample."""
    ends = np.cumsum([len(w.token_ids) for w in work])
    prompts = [(w, int(end) - len(w.token_ids), len(w.prompt_targets)) for w, end in zip(work, ends) if w.prompt_targets]
    samples = [(w, int(end) - 1) for w, end in zip(work, ends) if w.sample]
    return prompts, samples


def _flat_rows(prompts: PromptRows, samples: SampleRows) -> list[int]:
    return [first + j for _, first, count in prompts for j in range(count)] + [row for _, row in samples]
