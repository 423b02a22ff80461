"""GET /health and GET /metrics: open without an API key, for probes and Prometheus."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.body import CheckedRoute
from server.api.context import Context

router = APIRouter(route_class=CheckedRoute)


@router.get("/health")
async def health(ctx: Context) -> JSONResponse:
    if not ctx.engine.is_alive:
        return JSONResponse({"status": "engine not running"}, status_code=503)
    # 503 while draining too, so a load balancer stops sending work before the process exits.
    if ctx.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(ctx: Context) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
