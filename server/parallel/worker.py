"""A worker: every tensor-parallel rank but the first. It loads its shard, sizes and allocates its
cache and captures its graphs in step with the first rank (the same calls, in the same order, so
their collectives meet), then runs each plan the first rank sends until it sends stop.

Started by the server (`run_spawned`, one process per extra GPU) or by torchrun (`run_torchrun`,
the same `kvsplice serve` command on every rank; rank 0 serves HTTP, the others end up here).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass

import torch

from server.engine.config import EngineConfig, resolve_max_model_len
from server.engine.model_runner import ModelRunner, ModelSource, locate_model
from server.parallel.channel import StepChannel
from server.parallel.group import TensorParallel
from server.parallel.rendezvous import TorchrunRank, connect, disconnect, rank_config

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """What a spawned worker needs (pickled into the new process)."""

    config: EngineConfig  # with this rank's device
    max_model_len: int
    source: ModelSource
    rank: int
    world_size: int
    init_method: str
    log_level: int
    cpu_threads: int  # on the CPU: the ranks share the cores


def follow_first_rank(config: EngineConfig, max_model_len: int, source: ModelSource,
                      tp_stages: list[TensorParallel], channel: StepChannel) -> None:
    runner = ModelRunner(config, max_model_len, source, set(), tp_stages, channel)
    runner.allocate_kv_cache(runner.num_blocks_for_budget())
    runner.capture_decode_graphs()
    log.info("rank %d of %d ready on %s", runner.tp.rank, runner.tp.size, runner.device)
    while (plan := channel.receive()) is not None:
        runner.follow(plan)
    log.info("rank %d stopping", runner.tp.rank)


def run_spawned(spec: WorkerSpec) -> None:
    """Entry point of a worker process the server started."""
    _die_with_parent()
    _configure_logging(spec.log_level, spec.rank)
    device = torch.device(spec.config.device)
    if device.type == "cpu":
        torch.set_num_threads(spec.cpu_threads)
    try:
        tp_stages, channel = connect(spec.rank, spec.world_size, spec.init_method, device,
                                     spec.config.pipeline_parallel_size)
        follow_first_rank(spec.config, spec.max_model_len, spec.source, tp_stages, channel)
    except Exception:  # noqa: BLE001 - say why in the server's log; the first rank sees this process end
        log.exception("rank %d failed", spec.rank)
        sys.exit(1)
    finally:
        disconnect()


def run_torchrun(config: EngineConfig, place: TorchrunRank, log_level: int) -> int:
    """A torchrun rank other than 0: find the model as rank 0 does, then follow it. Returns the exit status.

    A supervisor's SIGTERM (or a terminal's SIGINT) reaches every rank; only rank 0 acts on it (it
    drains, then tells this rank to stop), so this rank ignores both."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _configure_logging(log_level, place.rank)
    config = rank_config(config, place.local_rank)
    try:
        tp_stages, channel = connect(place.rank, place.world_size, "env://", torch.device(config.device),
                                     config.pipeline_parallel_size)
        source = locate_model(config)
        follow_first_rank(config, resolve_max_model_len(config, source.config), source, tp_stages, channel)
    except Exception:  # noqa: BLE001
        log.exception("rank %d failed", place.rank)
        return 1
    finally:
        disconnect()
    return 0


def _configure_logging(level: int, rank: int) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
                        force=True)


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the server process dies, however it dies (a SIGKILL
    leaves no chance to stop the workers); elsewhere the closed control connection ends it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        sys.exit(1)
