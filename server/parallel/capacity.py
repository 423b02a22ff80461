"""What each GPU holds when one model spans several: weights, and KV bytes per token.

MLA caches one latent row per token and layer, read by every head. Splitting the heads over
tensor-parallel ranks therefore does not split the cache: every rank writes and keeps the same
rows (vLLM does the same for MLA; splitting the cache by sequence instead is a later step).
Splitting the layers over pipeline stages does: a GPU keeps only its stage's layers' rows. So per
GPU and token

    kv_bytes = (layers on the fullest stage) x (bytes per token and layer)

and at a KV budget of B bytes per GPU the engine holds B / kv_bytes tokens, whatever the
tensor-parallel size. What tensor parallelism buys is room: each GPU holds 1 / tp of the sharded
weights (the latent projection, norms and routers stay whole on every rank), so more of its
memory is left for that budget.

Weights are counted from the serving model itself, built on the meta device for the rank in
question: the same modules, the same shard shapes, no arithmetic of their own to drift.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kvsplice.cache_layout import CacheLayout
from server.attention.torch_backend import TorchBackend
from server.engine.placement import layers_per_device, split_layers
from server.model.deepseek_v2 import DeepseekV2ForCausalLM
from server.parallel.group import TensorParallel
from server.parallel.shards import check_shardable

META = torch.device("meta")


@dataclass(frozen=True)
class GpuShare:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    expert_parallel: bool
    weight_bytes: int  # on the fullest GPU
    kv_bytes_per_token: int  # on the fullest GPU: its stage's layers' rows of one token

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def tokens(self, kv_budget_bytes: int) -> int:
        """Tokens the engine holds at this KV budget on every GPU."""
        return max(0, kv_budget_bytes) // self.kv_bytes_per_token

    def as_dict(self) -> dict:
        return {**asdict(self), "num_gpus": self.num_gpus}

    def describe(self) -> str:
        split = (f"tensor_parallel_size {self.tensor_parallel_size}"
                 + (" (expert parallel)" if self.expert_parallel else "")
                 + f" x pipeline_parallel_size {self.pipeline_parallel_size}")
        return (f"{split}: each GPU holds {self.weight_bytes / 1e9:.2f} GB of weights and "
                f"{self.kv_bytes_per_token:,} B of KV per token (every tensor-parallel rank keeps the whole latent "
                f"of its layers)")


def gpu_share(hf_config, layout: CacheLayout, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
              expert_parallel: bool = False, dtype: torch.dtype = torch.bfloat16) -> GpuShare:
    """Weights and KV bytes per token of the fullest GPU (the one that decides capacity)."""
    check_shardable(hf_config, tensor_parallel_size, expert_parallel)
    stages = split_layers(hf_config.num_hidden_layers, [torch.device("cuda", s) for s in range(pipeline_parallel_size)])
    layers_on_stage = layers_per_device(stages)
    # Rank 0 is the fullest: shards are equal (the last vocabulary shard is padded to the others'
    # size), and expert parallelism deals the shared experts out from rank 0.
    weights = _stage_weight_bytes(hf_config, layout, 0, tensor_parallel_size, expert_parallel, dtype, stages)
    return GpuShare(tensor_parallel_size, pipeline_parallel_size, expert_parallel and tensor_parallel_size > 1,
                    weights, layout.bytes_per_token_per_layer * max(layers_on_stage.values()))


def _stage_weight_bytes(hf_config, layout: CacheLayout, rank: int, size: int, expert_parallel: bool,
                        dtype: torch.dtype, stages: list[torch.device]) -> int:
    """The largest stage's parameter and buffer bytes for one tensor-parallel rank."""
    tp = TensorParallel(rank, size)  # shapes only: a meta model runs no collective
    model = DeepseekV2ForCausalLM(hf_config, layout, TorchBackend(), 1, dtype, [META] * len(stages),
                                  layer_tp=[tp] * len(stages), expert_parallel=expert_parallel)
    per_stage = dict.fromkeys(stages, 0)
    for layer, stage in zip(model.layers, stages):
        per_stage[stage] += module_bytes(layer)
    per_stage[stages[0]] += module_bytes(model.embed_tokens)
    per_stage[stages[-1]] += module_bytes(model.norm) + model.lm_head.numel() * model.lm_head.element_size()
    return max(per_stage.values())


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
