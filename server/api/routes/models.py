"""GET /v1/models and GET /v1/models/{id}: the one model this server serves."""
from __future__ import annotations

from fastapi import APIRouter

from server.api.body import CheckedRoute
from server.api.context import Context
from server.api.protocol import ModelCard, ModelList

router = APIRouter(route_class=CheckedRoute)


@router.get("/v1/models")
async def list_models(ctx: Context) -> ModelList:
    return ModelList(data=[ModelCard(id=name, max_model_len=ctx.client.max_model_len) for name in ctx.model_names])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, ctx: Context) -> ModelCard:
    ctx.check_model(model_id)  # 404 for any other name, as OpenAI's models.retrieve gets
    return ModelCard(id=model_id, max_model_len=ctx.client.max_model_len)
