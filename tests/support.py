"""Reusable pieces for tests: engines with controllable behaviour, in-process apps, free ports."""

from __future__ import annotations

import socket
from typing import AsyncIterator

from core.config import ModelConfig, NodeSpec, ServerConfig
from core.errors import InvalidField, NotReady
from core.protocol import EngineResult, RequestContext
from engines.base import Engine, NoOptions
from engines.echo import EchoEngine
from nodes.common import Identity, Result
from nodes.router import ModelRouter
from pipelines.runner import Pipeline
from pipelines.stages import LocalEngine, LocalNode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FailingEngine(Engine):
    """Raises what the input says: "invalid" → InvalidField, "crash" → RuntimeError."""

    async def infer(self, inputs, params, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        if inputs == "invalid":
            raise InvalidField("input: not acceptable", model_id=ctx.model_id, field="input")
        if inputs == "crash":
            raise RuntimeError("boom")
        yield EngineResult(output=inputs, finish_reason="stop")


class UnhealthyEngine(Engine):
    async def infer(self, inputs, params, ctx):
        raise NotReady("engine core is down", model_id=ctx.model_id)
        yield  # pragma: no cover

    async def check_health(self) -> None:
        raise NotReady("engine core is down")


def model(model_id: str, **kw) -> ModelConfig:
    return ModelConfig(model_id=model_id, modality="text", pipeline="echo", engine="echo", **kw)


def local_pipeline(m: ModelConfig, engine_cls: type[Engine] = EchoEngine) -> Pipeline:
    p = Pipeline(m, LocalNode(Identity({}, m)), LocalEngine(engine_cls(m)), LocalNode(Result({}, m)))
    p.params_schema = engine_cls.Params
    return p


async def local_router(*pipelines: Pipeline) -> ModelRouter:
    router = ModelRouter(list(pipelines))
    await router.start()
    return router


__all__ = ["FailingEngine", "UnhealthyEngine", "NoOptions", "NodeSpec", "ServerConfig",
           "free_port", "local_pipeline", "local_router", "model"]
