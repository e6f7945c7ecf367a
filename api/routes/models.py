"""``GET /v1/models``, ``GET /v1/models/{model_id}``, ``/health`` and ``/ready``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter

from api.call import Call, CallDep
from api.errors import ERROR_SCHEMA
from core.errors import NotReady
from core.protocol import Adapter
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


def _status(status: str) -> dict[str, Any]:
    """``status`` (``ready``, ``starting``, ``failed``, ``recovering``, ``unavailable``,
    ``unhealthy``) and, where there is one, ``status_detail``: what a starting model waits
    for, why it failed or is unhealthy."""
    word, _, detail = status.partition(": ")
    return {"status": word, "status_detail": detail} if detail else {"status": word}


async def _entry(call: Call, pipeline: Pipeline, status: str) -> dict[str, Any]:
    card = await _card(pipeline, status, call.server.status_timeout_s)
    return {**card, **pipeline.describe(), "id": pipeline.model.model_id, "object": "model",
            "created": card.get("created", call.app.started), "owned_by": card.get("owned_by", "mmserve"),
            **_status(status), "ready_after_s": pipeline.ready_after_s}


def _adapter_entry(call: Call, adapter: Adapter, status: str) -> dict[str, Any]:
    """An adapter's entry, as an LLM server lists a LoRA adapter (``parent``: its base model's
    id, ``root``: its path), with its base model's status."""
    return {"id": adapter.name, "object": "model", "created": call.app.started, "owned_by": "mmserve",
            "root": adapter.path, "parent": adapter.base, **_status(status)}


@router.get("/v1/models", summary="Every served model and adapter, with its status")
async def list_models(call: CallDep):
    statuses = await call.router.statuses(call.server.status_timeout_s)
    data = await asyncio.gather(*(_entry(call, p, statuses[p.model.model_id]) for p in call.router))
    adapters = [_adapter_entry(call, a, statuses.get(a.base, "unavailable")) for a in call.router.adapters.values()]
    return {"object": "list", "data": [*data, *adapters]}


@router.get("/v1/models/{model_id:path}", responses={404: ERROR_SCHEMA},
            summary="One served model or adapter, with its status")
async def get_model(model_id: str, call: CallDep):
    pipeline = call.pipeline(model_id, serving=False)
    status = await pipeline.status(call.server.status_timeout_s)
    if (adapter := call.router.adapters.get(model_id)) is not None:
        return _adapter_entry(call, adapter, status)
    return await _entry(call, pipeline, status)


@router.get("/health", summary="The ingress process is alive")
async def health(call: CallDep):  # as every route: a failure here is the one logged 500 too
    return {"status": "ok"}


@router.get("/ready", responses={503: ERROR_SCHEMA}, summary="Every model is ready")
async def ready(call: CallDep):
    statuses = await call.router.statuses(call.server.status_timeout_s)
    waiting = {m: s for m, s in statuses.items() if s != "ready"}  # starting, failed too
    if waiting:
        return call.error(NotReady("not ready: " + ", ".join(f"{m} ({s})" for m, s in waiting.items()),
                                   retry="not_ready", details={"models": waiting}))
    return {"status": "ready", "models": statuses}
