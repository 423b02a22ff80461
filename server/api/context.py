"""What every route needs, built once per app and reached through `request.app.state`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.api.engine_client import EngineClient
from server.api.errors import APIError
from server.api.logprobs import TokenText
from server.api.metrics import ServerMetrics
from server.settings import Settings


@dataclass
class ServerContext:
    engine: object  # AsyncLLMEngine (or anything with its interface)
    settings: Settings
    client: EngineClient
    metrics: ServerMetrics
    model_name: str  # the name responses report as `model`: the first served name
    model_names: tuple[str, ...]  # every name clients may send as `model`
    token_text: TokenText
    draining: bool = False  # set on SIGTERM: refuse new work, let in-flight requests finish
    cut_requests: int = 0  # requests ended by the drain timeout instead of finishing

    def check_model(self, requested: str | None) -> None:
        """OpenAI clients always name a model; a wrong name is a 404, as with OpenAI."""
        if requested is not None and requested not in (*self.model_names, self.engine.model_name):
            raise APIError(404, f"model {requested!r} is not served here; this server serves {self.model_name!r}",
                           "model")


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


Context = Annotated[ServerContext, Depends(get_context)]
