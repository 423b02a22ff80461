"""How many cache blocks the KV budget buys.

Capacity in tokens = budget bytes / bytes per token, so at one budget the spliced cache holds
(kv_lora_rank + rope) / (r + rope) times more tokens (576 / 320 = 1.8x at ratio 0.5 on V2-Lite).
"""
from __future__ import annotations

import logging

import torch

from server.engine.config import EngineConfig

log = logging.getLogger(__name__)


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


def plan_num_blocks(config: EngineConfig, bytes_per_token: int, device: torch.device, max_tokens_needed: int,
                    budget_share: float = 1.0) -> int:
    """Blocks for the configured budget on one device: `kv_cache_bytes` times this device's share of
    the layers (a layer split spreads the cache) if set, else a fraction of the device's free memory
    (on the CPU capped at `max_tokens_needed` tokens)."""
    block_bytes = bytes_per_token * config.block_size
    if config.kv_cache_bytes is not None:
        budget = int(config.kv_cache_bytes * budget_share)
        num_blocks = budget // block_bytes
    else:
        budget = int(available_memory_bytes(device) * config.kv_cache_memory_fraction)
        num_blocks = budget // block_bytes
        if device.type == "cpu":
            # A fraction of RAM would be gigabytes of zeroed host memory for a tiny model; on the
            # CPU take no more than max_num_seqs full-length sequences can use.
            num_blocks = min(num_blocks, -(-max_tokens_needed // config.block_size))
    if num_blocks < 1:
        raise ValueError(
            f"kv cache budget of {budget:,} bytes holds no block of {config.block_size} tokens "
            f"({block_bytes:,} bytes); raise kv_cache_bytes"
        )
    return int(num_blocks)


def plan_split_blocks(config: EngineConfig, bytes_per_layer_token: int, layer_counts: dict[torch.device, int],
                      max_tokens_needed: int) -> int:
    """Blocks when the layers (and their cache) are spread over devices: a token takes a slot on
    every device, so the device that runs out first decides. `kv_cache_bytes` is the total over
    all devices, shared in proportion to their layers."""
    total_layers = sum(layer_counts.values())
    return min(
        plan_num_blocks(config, bytes_per_layer_token * n, device, max_tokens_needed, n / total_layers)
        for device, n in layer_counts.items()
    )
