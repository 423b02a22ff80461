"""GET /health (and /ping, its vLLM alias), GET /version and GET /metrics: open without an API key (unless
`metrics_require_api_key`), for probes, clients checking what they talk to, and Prometheus."""
from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.body import CheckedRoute
from server.api.context import Context
from server.api.endpoints import HEALTH_PATH, METRICS_PATH

router = APIRouter(route_class=CheckedRoute)


@router.get(HEALTH_PATH)
@router.get("/ping")
@router.post("/ping")
async def health(ctx: Context) -> JSONResponse:
    if not ctx.engine.is_alive:
        return JSONResponse({"status": "engine not running"}, status_code=503)
    # 503 while draining too, so a load balancer stops sending work before the process exits.
    if ctx.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": _package_version()})


def _package_version() -> str:
    try:
        return importlib.metadata.version("kvsplice")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


@router.get(METRICS_PATH)
async def metrics(ctx: Context) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
