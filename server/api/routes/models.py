"""GET /v1/models: the one model this server serves."""
from __future__ import annotations

from fastapi import APIRouter

from server.api.body import CheckedRoute
from server.api.context import Context
from server.api.protocol import ModelCard, ModelList

router = APIRouter(route_class=CheckedRoute)


@router.get("/v1/models")
async def list_models(ctx: Context) -> ModelList:
    return ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=ctx.client.max_model_len)])
