"""``GET /metrics``: every replica's Prometheus metrics in one scrape (``core.metrics``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from api.call import CallDep
from core import metrics
from core.errors import RouteNotFound

router = APIRouter()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def local_scrape(extra: list) -> bytes:
    """This process's metrics (an app served without Ray: the unit tests)."""
    return metrics.render(metrics.merge([({}, extra), ({}, metrics.local_families())]))


@router.get("/metrics", response_class=Response, summary="Prometheus metrics of every replica",
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
async def scrape(call: CallDep):
    if not call.server.metrics:
        raise RouteNotFound("no route /metrics: metrics are off (server.metrics: false)")
    statuses = await call.router.statuses(call.server.status_timeout_s)
    body = await call.app.scrape([metrics.status_family(statuses)])
    return Response(body, media_type=CONTENT_TYPE)
