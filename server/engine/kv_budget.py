"""How many cache blocks the KV budget buys.

Capacity in tokens = budget bytes / bytes per token, so at one budget the spliced cache holds
(kv_lora_rank + rope) / (r + rope) times more tokens (576 / 320 = 1.8x at ratio 0.5 on V2-Lite).
With the layers split over devices, every device holds its own layers' rows of every token, so the
device that runs out first decides.
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


def plan_num_blocks(config: EngineConfig, layout: CacheLayout, layer_counts: dict[torch.device, int],
                    max_tokens_needed: int) -> int:
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
        else:
            budget = int(available_memory_bytes(device) * config.kv_cache_memory_fraction)
        n = budget // block_bytes
        if device.type == "cpu" and config.kv_cache_bytes is None:
            n = min(n, -(-max_tokens_needed // layout.block_size))
        if n < 1:
            raise ValueError(f"kv cache budget of {budget:,} bytes on {device} holds no block of "
                             f"{layout.block_size} tokens ({block_bytes:,} bytes); raise kv_cache_bytes")
        blocks.append(int(n))
    return min(blocks)
