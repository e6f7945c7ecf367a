"""``GET /v1/models``, ``GET /v1/models/{model_id}``, ``/health`` and ``/ready``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request

from api.context import pipeline_of
from api.errors import ERROR_SCHEMA, error_response
from core.errors import NotReady
from pipelines.runner import Pipeline

logger = logging.getLogger("mmserve.api")
router = APIRouter()


async def _card(pipeline: Pipeline, status: str, timeout_s: float) -> dict[str, Any]:
    """The engine's own facts (e.g. max_model_len, root, permission) once it is ready."""
    if status != "ready":
        return {}
    try:
        return await asyncio.wait_for(pipeline.model_card(), timeout_s)
    except Exception as err:  # a listing never fails for one model's facts
        logger.warning("model card of %s: %s", pipeline.model.model_id, err)
        return {}


async def _entry(request: Request, pipeline: Pipeline, status: str) -> dict[str, Any]:
    state = request.app.state
    card = await _card(pipeline, status, state.server.status_timeout_s)
    return {**card, **pipeline.describe(), "id": pipeline.model.model_id, "object": "model",
            "created": card.get("created", state.started), "owned_by": card.get("owned_by", "mmserve"),
            "status": status}


@router.get("/v1/models", summary="Every served model, with its status")
async def list_models(request: Request):
    state = request.app.state
    statuses = await state.router.statuses(state.server.status_timeout_s)
    data = await asyncio.gather(*(_entry(request, p, statuses[p.model.model_id]) for p in state.router))
    return {"object": "list", "data": list(data)}


@router.get("/v1/models/{model_id:path}", responses={404: ERROR_SCHEMA},
            summary="One served model, with its status")
async def get_model(model_id: str, request: Request):
    state = request.app.state
    pipeline = pipeline_of(request, model_id)
    return await _entry(request, pipeline, await pipeline.status(state.server.status_timeout_s))


@router.get("/health", summary="The ingress process is alive")
async def health():
    return {"status": "ok"}


@router.get("/ready", responses={503: ERROR_SCHEMA}, summary="Every model is ready")
async def ready(request: Request):
    state = request.app.state
    statuses = await state.router.statuses(state.server.status_timeout_s)
    waiting = {m: s for m, s in statuses.items() if s != "ready"}
    if waiting:
        return error_response(NotReady("not ready: " + ", ".join(f"{m} ({s})" for m, s in waiting.items()),
                                       retry="not_ready", details={"models": waiting}), state.server,
                              request.state)
    return {"status": "ready", "models": statuses}
