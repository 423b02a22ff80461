"""How many cache blocks the KV budget buys.

Capacity in tokens = budget bytes / bytes per token, so at one budget the spliced cache holds
(kv_lora_rank + rope) / (r + rope) times more tokens (576 / 320 = 1.8x at ratio 0.5 on V2-Lite).
With the layers split over devices, every device holds its own layers' rows of every token, so the
device that runs out first decides.

The budget, in order of precedence: `kv_cache_bytes`; `gpu_memory_utilization` (vLLM's meaning: this
server may use that share of the GPU's total memory for weights, activations and KV, so KV gets
what is left after what is in use now and an estimate of a step's peak activations); else
`kv_cache_memory_fraction` of the memory free after the weights.
"""
from __future__ import annotations

import torch

from kvsplice.cache_layout import CacheLayout
from server.engine.config import EngineConfig


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device now (after the weights are loaded)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; set kv_cache_bytes")


def activation_bytes(hf_config, config: EngineConfig, dtype_bytes: int = 2) -> int:
    """An upper estimate of one step's transient memory: the largest per-token tensors of a layer
    (routed experts' gate/up and activation, the expanded K/V and queries of a prefill, residual
    and hidden), for max_num_batched_tokens tokens, plus float32 logits for max_num_seqs rows.
    The caching allocator keeps such peaks, so they must be left out of the KV budget."""
    h, heads = hf_config.hidden_size, hf_config.num_attention_heads
    qk = hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim
    experts = getattr(hf_config, "num_experts_per_tok", 0) * 3 * getattr(hf_config, "moe_intermediate_size", 0)
    dense = 3 * getattr(hf_config, "intermediate_size", 0)
    attention = heads * (2 * qk + 2 * hf_config.v_head_dim)
    per_token = max(experts, dense) + attention + 4 * h
    logits = config.max_num_seqs * hf_config.vocab_size * 4
    return config.max_num_batched_tokens * per_token * dtype_bytes + logits


def utilization_budget(utilization: float, total: int, free: int, activations: int) -> int:
    """What KV may take under vLLM's gpu_memory_utilization: the share of the whole GPU, less
    everything in use now (weights, other processes) and the activation reserve."""
    return int(utilization * total) - (total - free) - activations


def plan_num_blocks(config: EngineConfig, layout: CacheLayout, layer_counts: dict[torch.device, int],
                    max_tokens_needed: int, hf_config=None) -> int:
    """Blocks every device can hold. `kv_cache_bytes` is the total over the devices, shared in
    proportion to their layers; without it each device gives a fraction of its free memory (on
    the CPU capped at `max_tokens_needed` tokens: a fraction of RAM would be gigabytes of zeros
    for a tiny model)."""
    total_layers = sum(layer_counts.values())
    blocks = []
    for device, layers in layer_counts.items():
        block_bytes = layout.block_bytes(layers)
        if config.kv_cache_bytes is not None:
            budget = int(config.kv_cache_bytes * layers / total_layers)
        elif config.gpu_memory_utilization is not None:
            if device.type != "cuda":
                raise ValueError("gpu_memory_utilization needs a GPU; on the CPU set kv_cache_bytes or "
                                 "kv_cache_memory_fraction")
            free, total = torch.cuda.mem_get_info(device)
            if hf_config is None:
                raise ValueError("gpu_memory_utilization needs the model config for its activation reserve")
            reserve = activation_bytes(hf_config, config, layout.bytes_per_value)
            budget = utilization_budget(config.gpu_memory_utilization, total, free, reserve)
        else:
            budget = int(available_memory_bytes(device) * config.kv_cache_memory_fraction)
        n = budget // block_bytes
        if device.type == "cpu" and config.kv_cache_bytes is None:
            n = min(n, -(-max_tokens_needed // layout.block_size))
        if n < 1:
            raise ValueError(f"kv cache budget of {budget:,} bytes on {device} holds no block of "
                             f"{layout.block_size} tokens ({block_bytes:,} bytes); raise kv_cache_bytes "
                             f"(or gpu_memory_utilization)")
        blocks.append(int(n))
    return min(blocks)
