"""The first rank's handle on the other ranks: start them, join their groups, notice when one dies,
stop them.

Three ways to have them:
- `spawn`: the server starts one process per extra GPU (vLLM's multiprocessing executor), each
  running server/parallel/worker.py, and they meet on a loopback port.
- `torchrun`: torchrun started every rank (one node or several); rank 0 is this process.
- `alone`: no other rank at all, and collectives that do nothing. The first rank runs its shard
  by itself, which is what one GPU of a tensor-parallel group computes and holds, without the
  communication: for measuring a group larger than the machine (scripts, never the server).

A worker that dies cannot be replaced (its shard and its cache are gone), so the engine must stop:
a watcher thread reports the death to whoever registered (the async engine fails every request
and the server exits so that its supervisor restarts it); until then (start-up, or an engine
driven directly) it ends the process with a message, since the first rank may be waiting inside
a collective that will never complete.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
from torch import Tensor

from server.engine.config import EngineConfig
from server.parallel.channel import StepChannel
from server.parallel.group import TensorParallel
from server.parallel.rendezvous import (TorchrunRank, check_world_size, connect, disconnect, local_init_method,
                                        rank_config)
from server.parallel.worker import WorkerSpec, run_spawned

log = logging.getLogger(__name__)
EXIT_WORKER_DIED = 2  # the CLI's status for a server that could not start
STOP_TIMEOUT_S = 30.0
START_GRACE_S = 10.0  # before a dead worker ends the process, the first rank's own failure may stop it


class Workers:
    def __init__(self, tp_stages: list[TensorParallel], channel: StepChannel | None,
                 processes: list[multiprocessing.Process] | None = None, local_rank: int = 0) -> None:
        self.tp_stages, self.channel = tp_stages, channel  # the model's group of each pipeline stage
        self.local_rank = local_rank  # which of this host's GPUs the first rank uses
        self.processes = processes or []
        self.failure: str | None = None
        self._on_failure: Callable[[str], None] = _exit_process
        self._stopping = threading.Event()
        if self.processes:
            threading.Thread(target=self._watch, name="kvsplice-workers", daemon=True).start()

    # -- the three ways ---------------------------------------------------------------------------

    @classmethod
    def spawn(cls, config: EngineConfig, max_model_len: int, source) -> Workers:
        """Start ranks 1..N-1 as processes of this host and join them as rank 0."""
        size, device = config.tensor_parallel_size, torch.device(rank_config(config, 0).device)
        if device.type == "cuda":
            needed = size * config.pipeline_parallel_size
            if torch.cuda.device_count() < needed:
                raise ValueError(f"tensor_parallel_size={size} x pipeline_parallel_size={config.pipeline_parallel_size} "
                                 f"needs {needed} GPUs; {torch.cuda.device_count()} are visible")
        init_method = local_init_method()
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        threads = max(1, (os.cpu_count() or 1) // size)
        processes = []
        for rank in range(1, size):
            spec = WorkerSpec(rank_config(config, rank), max_model_len, source, rank, size, init_method,
                              logging.getLogger().getEffectiveLevel(), threads)
            process = context.Process(target=run_spawned, args=(spec,), name=f"kvsplice-rank-{rank}", daemon=True)
            process.start()
            processes.append(process)
        log.info("started tensor-parallel ranks 1..%d (pids %s)", size - 1, ", ".join(str(p.pid) for p in processes))
        workers = cls([], None, processes)  # watched from now on: a dead rank ends start-up
        try:
            workers.tp_stages, workers.channel = connect(0, size, init_method, device, config.pipeline_parallel_size)
        except BaseException:
            workers.abort()
            raise
        return workers

    @classmethod
    def torchrun(cls, place: TorchrunRank, config: EngineConfig) -> Workers:
        """Rank 0 of a torchrun launch; the others run server.parallel.worker.run_torchrun."""
        check_world_size(place, config.tensor_parallel_size)
        device = torch.device(rank_config(config, place.local_rank).device)
        tp_stages, channel = connect(place.rank, place.world_size, "env://", device, config.pipeline_parallel_size)
        return cls(tp_stages, channel, local_rank=place.local_rank)

    @classmethod
    def alone(cls, size: int) -> Workers:
        """Rank 0 of `size` with no other rank: collectives are no-ops (torch's fake backend)."""
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a process group")
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
        return cls([AloneTensorParallel(0, size, dist.group.WORLD)], None)

    # -- while serving ----------------------------------------------------------------------------

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Who hears of a dead rank from now on (the default ends the process: start-up)."""
        self._on_failure = callback
        if self.failure is not None:
            callback(self.failure)

    def stop(self) -> None:
        """Tell the workers to stop, wait for them, leave the groups."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.channel is not None and self.failure is None:
            try:
                self.channel.send(None)
            except Exception:  # noqa: BLE001 - a worker already gone: terminate below
                log.warning("could not tell the workers to stop", exc_info=True)
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
        disconnect()

    def abort(self) -> None:
        """End the workers without a word (the first rank failed to start: they may be waiting in
        a collective it will never join)."""
        self._stopping.set()
        for process in self.processes:
            process.terminate()
            process.join(STOP_TIMEOUT_S)
        disconnect()

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        ready = wait(list(sentinels))
        if self._stopping.is_set():
            return
        dead = sentinels[ready[0]]
        dead.join()
        self.failure = f"tensor-parallel worker {dead.name} (pid {dead.pid}) exited with status {dead.exitcode}"
        log.error("%s: the engine cannot run without it", self.failure)
        if self._on_failure is _exit_process and self._stopping.wait(START_GRACE_S):
            return  # the first rank failed too (a setting every rank refuses) and says why itself
        self._on_failure(self.failure)


class AloneTensorParallel(TensorParallel):
    """Rank 0 with no other rank: the other ranks' logit slices are zeros (the fake backend's gather
    leaves its outputs as they were allocated, which may be anything, NaN included)."""

    def gather_to_first(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(*x.shape[:-1], x.shape[-1] * (self.size - 1))], dim=-1)


def _exit_process(reason: str) -> None:
    """Nobody else listens (start-up, or an engine driven without the server): this rank may be
    blocked in a collective that will never complete, so the process ends here."""
    print(f"kvsplice: {reason} (its log is above); stopping", file=sys.stderr, flush=True)
    os._exit(EXIT_WORKER_DIED)
