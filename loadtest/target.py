"""One server under test: its HTTP clients, what it serves, and its metrics, opened together."""
from __future__ import annotations

from dataclasses import dataclass

import httpx

from loadtest.client import CompletionClient, ServerInfo, discover, health_problem, new_http_client
from loadtest.safety import check_target
from loadtest.server_metrics import MetricsSnapshot, MetricsSource


@dataclass(frozen=True)
class ClientOptions:
    allow_remote: bool = False
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None
    request_timeout_s: float = 300.0  # longest silence within one request
    metrics_prefix: str = "kvsplice:"
    temperature: float = 0.0
    ignore_eos: bool = True  # fixed output lengths: the workload decides them, not the model
    seed: int | None = None  # per-request sampling seed base (seed + request index)
    # "chunks": time each streamed chunk (no extra server work, but a chunk may hold several
    # tokens without saying so); "logprobs": ask for logprobs=0, so every chunk lists its tokens.
    token_timing: str = "chunks"

    def sampling(self) -> dict:
        fields = {"temperature": self.temperature, "ignore_eos": self.ignore_eos}
        if self.token_timing == "logprobs":
            fields["logprobs"] = 0
        if self.seed is not None:
            fields["seed"] = self.seed
        return fields


@dataclass
class Target:
    label: str  # "A", "B", or "server" when there is one
    info: ServerInfo
    client: CompletionClient
    metrics: MetricsSource
    first_metrics: MetricsSnapshot | None  # None: the server exports no /metrics we can read
    _http: httpx.AsyncClient
    _metrics_http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def has_metrics(self) -> bool:
        return self.first_metrics is not None

    async def health_problem(self) -> str | None:
        return await health_problem(self._metrics_http, self.url)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._metrics_http.aclose()


async def connect(url: str, label: str, options: ClientOptions, clock0: float) -> Target:
    """Check the URL is allowed, find the model, take a first /metrics snapshot."""
    url = check_target(url, options.allow_remote)
    http = new_http_client(options.request_timeout_s, options.api_key)
    # A separate client for probes so they never queue behind the load's connections.
    metrics_http = new_http_client(30.0, options.api_key)
    try:
        info = await discover(http, url, options.model)
        metrics = MetricsSource(metrics_http, url, options.metrics_prefix, clock0)
        try:
            first = await metrics.scrape()
        except httpx.HTTPError:
            first = None
        client = CompletionClient(http, info, options.sampling(), clock0)
    except BaseException:
        await http.aclose()
        await metrics_http.aclose()
        raise
    return Target(label, info, client, metrics, first, http, metrics_http)
