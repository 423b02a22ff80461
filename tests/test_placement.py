"""Layer split over several GPUs: placement and capacity arithmetic (pure functions, CPU)."""
from __future__ import annotations

import torch

from kvsplice.cache_layout import CacheLayout
from kvsplice.model_source import load_config
from server.engine.config import EngineConfig
from server.engine.kv_budget import plan_num_blocks
from server.engine.placement import describe, layers_per_device, split_layers

GPUS = [torch.device("cuda", i) for i in range(8)]


def test_split_is_contiguous_and_balanced():
    for n in (1, 2, 3, 4, 8):
        layers = split_layers(27, GPUS[:n])
        counts = list(layers_per_device(layers).values())
        assert sum(counts) == 27 and max(counts) - min(counts) <= 1
        assert layers == sorted(layers, key=lambda d: d.index)  # contiguous groups, in order
    assert describe(split_layers(27, GPUS[:2])) == "cuda:0 layers 0-13, cuda:1 layers 14-26"


def test_capacity_over_n_gpus_is_exact():
    """Per GPU budget B: N GPUs hold N times the tokens of one (up to the larger layer group)."""
    cfg = load_config("deepseek-v2-lite")
    layout = CacheLayout.for_ratio(cfg, 0.5, block_size=64)
    per_layer = layout.bytes_per_token_per_layer
    per_gpu_budget = 20 << 30
    one = plan_num_blocks(EngineConfig(kv_cache_bytes=per_gpu_budget, block_size=64), layout,
                          {GPUS[0]: 27}, 1 << 40)
    for n in (2, 3, 4):
        counts = layers_per_device(split_layers(27, GPUS[:n]))
        blocks = plan_num_blocks(EngineConfig(kv_cache_bytes=per_gpu_budget * n, block_size=64), layout,
                                 counts, 1 << 40)
        # The fullest GPU (ceil(27 / n) layers) decides; its share of the total budget is that fraction.
        biggest = max(counts.values())
        expected = int(per_gpu_budget * n * biggest / 27) // (per_layer * biggest * 64)
        assert blocks == expected
        assert abs(blocks / one - n) <= n * 0.05


def test_full_v2_shape_bytes_per_gpu():
    cfg = load_config("deepseek-v2")
    layout = CacheLayout.for_ratio(cfg, 0.5)
    assert layout.code_dim == 256 and layout.num_layers == 60
    counts = layers_per_device(split_layers(cfg.num_hidden_layers, GPUS[:8]))
    assert sum(layout.bytes_per_token_per_layer * n for n in counts.values()) == layout.bytes_per_token
