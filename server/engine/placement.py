"""Where the model's layers live when one model spans several GPUs of a host (a layer split).

Layers are cut into contiguous groups (stages), one per GPU; the embedding sits with the first
group, the final norm and lm_head with the last. Each GPU holds the paged cache of its own layers,
so a token costs `layers_on_gpu x (r + rope) x bytes` on each GPU and every GPU must hold every
running token: capacity is the smallest of the GPUs' budgets over their per-token bytes.

With tensor parallelism each rank splits its layers the same way over GPUs of its own. On the CPU
every stage is the CPU: a layer split there changes no placement, only which tensor-parallel group
each layer's collectives use (the tests run it that way).
"""
from __future__ import annotations

from typing import TypeVar

import torch

T = TypeVar("T")


def gpu_devices(count: int, first: int = 0) -> list[torch.device]:
    """`count` consecutive GPUs from `first` (a tensor-parallel rank's stages start at its own GPU)."""
    available = torch.cuda.device_count()
    if first + count > available:
        raise ValueError(f"pipeline_parallel_size={count} from cuda:{first} needs {first + count} CUDA device(s); "
                         f"{available} are visible")
    return [torch.device("cuda", i) for i in range(first, first + count)]


def stage_devices(first: torch.device, count: int) -> list[torch.device]:
    """The devices of `count` stages: consecutive GPUs from `first`, or the CPU for each."""
    return gpu_devices(count, first.index) if first.type == "cuda" else [first] * count


def split_layers(num_layers: int, stages: list[T]) -> list[T]:
    """Stage (device, or index) of each layer: contiguous groups, sizes differing by at most one
    (earlier groups larger)."""
    if len(stages) > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {len(stages)} devices")
    base, extra = divmod(num_layers, len(stages))
    placement: list[T] = []
    for i, stage in enumerate(stages):
        placement += [stage] * (base + (1 if i < extra else 0))
    return placement


def layers_per_device(layer_devices: list[torch.device]) -> dict[torch.device, int]:
    counts: dict[torch.device, int] = {}
    for device in layer_devices:
        counts[device] = counts.get(device, 0) + 1
    return counts


def describe(layer_devices: list[torch.device]) -> str:
    """e.g. 'cuda:0 layers 0-13, cuda:1 layers 14-26' for the start-up log."""
    parts, start = [], 0
    for device, count in layers_per_device(layer_devices).items():
        parts.append(f"{device} layers {start}-{start + count - 1}")
        start += count
    return ", ".join(parts)
