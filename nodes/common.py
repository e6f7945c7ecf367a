"""Nodes that any modality can use."""

from __future__ import annotations

from typing import Any

from core.protocol import EngineResult, RequestContext
from nodes.base import Node


class Identity(Node):
    """Preprocess that hands the input to the engine unchanged."""

    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        return payload


class Result(Node):
    """Postprocess that shapes an engine result as the ``/v1/infer`` response body."""

    async def __call__(self, payload: EngineResult, ctx: RequestContext) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": ctx.model_id, "output": payload.output,
                                "finish_reason": payload.finish_reason}
        if payload.usage is not None:
            body["usage"] = payload.usage
        return body
