"""Joining the ranks of a tensor-parallel engine into their process groups.

Two groups over the same processes: the model's (NCCL on GPUs, gloo on the CPU), whose collectives
run inside the forward, and a gloo group for the step records (server/parallel/channel.py), so
control never waits behind GPU work. The ranks meet at `init_method`: a local TCP address when the
server starts its own workers, `env://` under torchrun (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from server.engine.config import EngineConfig
from server.parallel.channel import StepChannel
from server.parallel.group import TensorParallel

# A collective of the model waits at most this long for the other ranks (a step, or start-up's
# weight loading and graph capture on the slowest rank); a rank that is gone fails it sooner.
MODEL_TIMEOUT = timedelta(minutes=30)
# A worker waits for the next step record for as long as the server stays idle.
IDLE_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class TorchrunRank:
    rank: int
    world_size: int
    local_rank: int


def torchrun_rank() -> TorchrunRank | None:
    """This process's place when torchrun (or any launcher setting its variables) started it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return TorchrunRank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                        int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def check_world_size(place: TorchrunRank, tensor_parallel_size: int) -> None:
    if place.world_size != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} but torchrun started {place.world_size} "
                         f"ranks (WORLD_SIZE); they must be equal")


def local_init_method() -> str:
    """A loopback address with a port that was free a moment ago, for workers this process starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def rank_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """The config a rank runs with: its own device (GPU local_rank x the stages a rank spans)."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return replace(config, device="cpu")
    first = torch.device(config.device if config.device != "auto" else "cuda")
    base = 0 if first.index is None else first.index
    return replace(config, device=f"cuda:{base + local_rank * config.pipeline_parallel_size}")


def connect(rank: int, world_size: int, init_method: str, device: torch.device,
            stages: int = 1) -> tuple[list[TensorParallel], StepChannel]:
    """Join the groups (every rank calls this; it returns once all have): the model's group of each
    pipeline stage, and the step channel's. The stages' groups hold the same ranks, but a rank's
    stages sit on different GPUs and an NCCL communicator serves one GPU."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a process group: one tensor-parallel engine per process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=MODEL_TIMEOUT)
    groups = [dist.group.WORLD] + [dist.new_group(backend=backend, timeout=MODEL_TIMEOUT) for _ in range(stages - 1)]
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return [TensorParallel(rank, world_size, g) for g in groups], StepChannel(control, rank)


def disconnect() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
