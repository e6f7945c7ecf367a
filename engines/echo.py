"""The echo engine: returns its input, optionally after a delay.

It measures the framework's own overhead (nothing else costs time) and serves tests and load
generator checks (with a fixed delay, latency ~ delay and throughput ~ concurrency / delay).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from core.protocol import EngineResult, RequestContext
from engines.base import Engine


class EchoKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay_s: float = Field(0.0, ge=0, le=60, description="Default seconds to wait before answering.")


class EchoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay_s: float | None = Field(None, ge=0, le=60, description="Overrides the engine's delay_s.")


class EchoEngine(Engine[EchoParams]):
    """Yields the input back, once, with ``finish_reason`` "stop"."""

    Kwargs = EchoKwargs
    Params = EchoParams

    async def infer(self, inputs, params: EchoParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        delay = self.kwargs.delay_s if params.delay_s is None else params.delay_s
        if delay:
            await asyncio.sleep(delay)
        yield EngineResult(output=inputs, finish_reason="stop")
