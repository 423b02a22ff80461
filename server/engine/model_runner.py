"""Loads the model through transformers and runs one flattened batch step over the paged cache.

Everything but attention is transformers' own modules (embedding, RMSNorms, dense MLP / MoE,
lm_head); each layer's attention is replaced by `PagedMLAAttention`, which reads and writes the
cache of stored codes.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor

from kvsplice.cache_size import get_kv_cache_size
from kvsplice.model_source import load_config, load_pretrained
from kvsplice.patch import find_mla_layers, make_splices
from kvsplice.storage import load_splices
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.fused_moe import install_fused_moe
from server.engine.kv_budget import plan_split_blocks
from server.engine.placement import device_map, gpu_devices, layers_per_device, place_model, split_layers
from server.engine.mla_attention import AttentionMetadata, PagedMLAAttention
from server.engine.scheduler import ScheduledSeq

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def choose_experts_implementation(model, device: torch.device, dtype: torch.dtype) -> None:
    """Pick transformers' MoE experts kernel. On CUDA the decode step is captured in a graph, so the
    experts must not synchronise with the host: grouped_mm does not in bf16/fp16, but in fp32 it
    copies from the host (seen on the H200, torch 2.11), so fp32 uses batched_mm (gathers the
    selected experts' weights; slower, only for exactness tests). The CPU keeps the default."""
    if device.type == "cuda" and hasattr(model.config, "_experts_implementation"):
        model.config._experts_implementation = "batched_mm" if dtype == torch.float32 else "grouped_mm"


class ModelRunner:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None) -> None:
        self.config = config
        self.device = resolve_device(config.device)  # where a step's inputs start (the first GPU)
        self.dtype = resolve_dtype(config.dtype, self.device)
        split = self._split_layers(model) if config.pipeline_parallel_size > 1 else None
        if model is None:
            model, tokenizer = load_pretrained(config.model, self.dtype, str(self.device), config.trust_remote_code,
                                               device_map=device_map(split) if split else None)
        elif split:
            place_model(model, split)
        self.model, self.tokenizer = model, tokenizer
        self.hf_config = model.config
        self.layer_devices = split or [self.device] * self.hf_config.num_hidden_layers
        choose_experts_implementation(model, self.device, self.dtype)
        if self.device.type == "cuda" and config.fused_moe:
            install_fused_moe(model)  # decode-sized batches take the Triton experts, larger ones transformers'
        splices = self._splices()
        self.attention = [PagedMLAAttention(attn, s) for attn, s in zip(find_mla_layers(model), splices)]
        self.code_dim = self.attention[0].code_dim
        self.cache_size = get_kv_cache_size(self.hf_config, compression_ratio=config.compression_ratio, dtype=self.dtype)
        self.kv_cache: list[Tensor] = []  # per layer, [num_blocks + 1, block_size, r + rope] on its device
        self.graphs: DecodeGraphs | None = None

    def _split_layers(self, model) -> list[torch.device]:
        """Each layer's GPU for a layer split over pipeline_parallel_size GPUs."""
        if self.device.type != "cuda":
            raise ValueError("pipeline_parallel_size > 1 needs CUDA devices")
        num_layers = (model.config if model is not None else load_config(self.config.model)).num_hidden_layers
        return split_layers(num_layers, gpu_devices(self.config.pipeline_parallel_size))

    @property
    def multi_device(self) -> bool:
        return len(set(self.layer_devices)) > 1

    def _splices(self) -> list:
        """Per-layer splices (or None each at ratio 1.0), on the model's device and dtype."""
        cfg = self.config
        if cfg.splice_file:
            splices = load_splices(cfg.splice_file, self.model)
            if abs(splices[0].compression_ratio - cfg.compression_ratio) > 1e-9:
                raise ValueError(
                    f"splice_file {cfg.splice_file} has compression_ratio {splices[0].compression_ratio}, "
                    f"the engine is set to {cfg.compression_ratio}"
                )
        elif cfg.compression_ratio == 1.0:
            return [None] * self.hf_config.num_hidden_layers
        else:
            splices = make_splices(self.hf_config, cfg.compression_ratio, cfg.splice_init, seed=cfg.seed)
        return [s.to(device=d, dtype=self.dtype).eval() for s, d in zip(splices, self.layer_devices)]

    @property
    def kv_dim(self) -> int:
        return self.code_dim + self.hf_config.qk_rope_head_dim

    def allocate_kv_cache(self, max_tokens_needed: int) -> BlockManager:
        """Size the cache from the KV budget and allocate one tensor for all layers. One extra block
        that no sequence owns takes the writes of CUDA-graph padding rows."""
        per_layer = self.cache_size.bytes_per_token // self.hf_config.num_hidden_layers
        counts = layers_per_device(self.layer_devices)
        num_blocks = plan_split_blocks(self.config, per_layer, counts, max_tokens_needed)
        for device, n in counts.items():
            shape = (n, num_blocks + 1, self.config.block_size, self.kv_dim)
            self.kv_cache.extend(torch.zeros(shape, dtype=self.dtype, device=device).unbind(0))
        return BlockManager(num_blocks, self.config.block_size)

    def capture_decode_graphs(self, max_batch: int, max_context_len: int) -> None:
        """On CUDA (unless disabled), capture the decode forward for batch sizes up to max_batch."""
        if self.device.type != "cuda" or not self.config.cuda_graphs or self.multi_device:
            return  # a graph is captured on one device; a layer split runs eagerly
        scratch_block = self.kv_cache[0].shape[0] - 1
        self.graphs = DecodeGraphs(self.forward_eager, max_batch, max_context_len, self.config.block_size,
                                   scratch_block, self.device)

    # -- one step ---------------------------------------------------------------------------------

    def prepare(self, batch: list[ScheduledSeq], block_size: int) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Flatten the scheduled tokens into (input_ids, positions, attention metadata)."""
        ids, positions, slots, query_lens, context_lens = [], [], [], [], []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end))
            query_lens.append(item.num_tokens)
            context_lens.append(end)
        max_blocks = max(len(item.seq.block_table) for item in batch)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in batch]
        starts = [0]
        for n in query_lens[:-1]:
            starts.append(starts[-1] + n)
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        fresh = [i for i, n in enumerate(query_lens) if n > 1 and context_lens[i] == n]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            query_lens=query_lens,
            query_starts=starts,
            context_lens_list=context_lens,
            decode_seqs=torch.tensor(decode, dtype=torch.long, device=dev),
            decode_tokens=torch.tensor([starts[i] for i in decode], dtype=torch.long, device=dev),
            prefill_seqs=[i for i, n in enumerate(query_lens) if n > 1 and context_lens[i] > n],
            max_decode_context=max((context_lens[i] for i in decode), default=0),
        )
        if fresh:
            self._add_fresh_prefill(meta, fresh, starts, query_lens)
        return torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta

    def _add_fresh_prefill(self, meta: AttentionMetadata, fresh: list[int], starts: list[int],
                           query_lens: list[int]) -> None:
        """Padded [Bf, Lmax] token-row index of the sequences whose tokens are all new this step."""
        longest = max(query_lens[i] for i in fresh)
        index = torch.zeros(len(fresh), longest, dtype=torch.long)
        valid = torch.zeros(len(fresh), longest, dtype=torch.bool)
        for b, i in enumerate(fresh):
            n = query_lens[i]
            index[b, :n] = torch.arange(starts[i], starts[i] + n)
            valid[b, :n] = True
        meta.fresh_index = index.to(self.device)
        meta.fresh_valid = valid.to(self.device)
        meta.fresh_rows = index[valid].to(self.device)

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        """Final-norm hidden states [T, hidden] of the flattened batch (the cache is updated)."""
        if self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(input_ids, positions, meta)
        return self.forward_eager(input_ids, positions, meta)

    @torch.inference_mode()
    def forward_eager(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        inner = self.model.model
        h = inner.embed_tokens(input_ids)
        freqs_cis = inner.rotary_emb(h, position_ids=positions[None])
        for i, layer in enumerate(inner.layers):
            device = self.layer_devices[i]
            if h.device != device:  # crossing to the next GPU of a layer split
                h, freqs_cis, meta = h.to(device), freqs_cis.to(device), meta.to(device)
            # Triton launches on the current CUDA device, not the tensors': make it this layer's.
            with torch.cuda.device(device) if self.multi_device else contextlib.nullcontext():
                h = h + self.attention[i](layer.input_layernorm(h), freqs_cis, self.kv_cache[i], meta)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        return inner.norm(h)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden).float()
