"""The tool's modes, as sequences of runs: load runs (concurrency, rate, sweep), a capacity search,
and the A/B comparison. Results are saved after every run, so whatever happens next, what was
measured so far is on disk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from loadtest.capacity import CapacityResult, CapacitySearch, SearchConfig
from loadtest.compare import compare
from loadtest.results import ResultStore
from loadtest.runner import Limits, Load, run_load
from loadtest.target import ClientOptions, Target, connect
from loadtest.workload import Workload, WorkloadConfig

CAPACITY_TOKENS = {"cap-a": "A", "cap-b": "B"}  # compare's --concurrency may name a measured capacity


@dataclass
class Session:
    store: ResultStore
    options: ClientOptions
    workload_config: WorkloadConfig
    limits: Limits
    search: SearchConfig
    poll_interval_s: float = 0.5
    progress: bool = True
    clock0: float = field(default_factory=time.perf_counter)
    targets: list[Target] = field(default_factory=list)

    async def connect(self, url: str, label: str) -> Target:
        target = await connect(url, label, self.options, self.clock0)
        self.targets.append(target)
        first = target.first_metrics
        self.store.add_server(label, {
            "url": target.url, "model": target.info.model, "max_model_len": target.info.max_model_len,
            "metrics": first is not None,
            "compression_ratio": first.compression_ratio if first else None,
            "kv_cache_dtype": first.kv_cache_dtype if first else None,
            "kv_bytes_per_token": first.kv_bytes_per_token if first else None,
            "kv_capacity_tokens": first.kv_capacity_tokens if first else None,
        })
        return target

    def workload(self) -> Workload:
        """One workload for every target: sized for the smallest context length among them."""
        lengths = [t.info.max_model_len for t in self.targets if t.info.max_model_len]
        workload = Workload(self.workload_config, min(lengths) if lengths else None)
        self.store.doc["workload"]["description"] = workload.describe()
        return workload

    async def load_run(self, target: Target, workload: Workload, load: Load) -> None:
        await run_load(target, workload, load, self.limits, clock0=self.clock0, poll_interval_s=self.poll_interval_s,
                       on_start=self.store.add_run, progress=self.progress)
        self.store.save()

    async def capacity(self, target: Target, workload: Workload) -> CapacityResult:
        search = CapacitySearch(target, workload, self.search, clock0=self.clock0, on_run=self._record_trial,
                                progress=self.progress)
        try:
            return await search.run()
        finally:  # also a search cut short by a failing server: its trials so far are results
            self.store.set_capacity(target.label, search.result.as_dict())
            self.store.save()

    def _record_trial(self, run) -> None:
        self.store.add_run(run)
        if len(self.store.runs) > 1:
            self.store.save()  # the previous trial is complete: keep it

    async def close(self) -> None:
        for target in self.targets:
            await target.aclose()


async def run_loads(session: Session, url: str, loads: list[Load]) -> None:
    """concurrency, rate and sweep: the loads one after the other against one server."""
    target = await session.connect(url, "server")
    workload = session.workload()
    for load in loads:
        await session.load_run(target, workload, load)


async def run_capacity(session: Session, url: str) -> None:
    target = await session.connect(url, "server")
    await session.capacity(target, session.workload())


async def run_compare(session: Session, url_a: str, url_b: str, loads: list[Load | str],
                      with_capacity: bool = True) -> None:
    """Capacity of A and of B (unless skipped), then each load on A and then on B, interleaved so
    that any drift of the machine over time touches both alike."""
    targets = [await session.connect(url_a, "A"), await session.connect(url_b, "B")]
    workload = session.workload()
    capacities: dict[str, int] = {}
    if with_capacity:
        for target in targets:
            capacities[target.label] = (await session.capacity(target, workload)).capacity
    for load in _resolve(loads, capacities, session.workload_config.seed):
        for target in targets:
            await session.load_run(target, workload, load)
    summaries = [run["summary"] for run in session.store.document()["runs"]]
    session.store.set_comparison(compare(session.store.doc["capacity"], summaries))


def _resolve(loads: list[Load | str], capacities: dict[str, int], seed: int) -> list[Load]:
    """'cap-a' / 'cap-b' become closed-loop loads at that server's measured capacity (skipped if unknown)."""
    resolved: list[Load] = []
    for load in loads:
        if isinstance(load, str):
            n = capacities.get(CAPACITY_TOKENS[load], 0)
            if n < 1:
                continue
            load = Load(concurrency=n, seed=seed)
        if load not in resolved:
            resolved.append(load)
    return resolved
