"""The contract every engine implements.

An engine is built cheaply from its validated :class:`~core.config.ModelConfig`; heavy work
(loading weights, starting a backend) happens in :meth:`Engine.start`. Requests go through
:meth:`Engine.infer`, an async generator, so that streaming engines yield chunks as they come
and others yield once. Engines never see ``DictConfig``s or raw HTTP bodies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, ClassVar

from pydantic import BaseModel, ConfigDict

from core.config import ModelConfig
from core.protocol import EngineResult, RequestContext


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Engine(ABC):
    """Base of all engines.

    Subclasses set ``Kwargs`` (the schema of ``engine_kwargs``) and ``Params`` (the schema of
    per-request ``params``); both reject unknown keys, so typos fail with the field's name.
    """

    Kwargs: ClassVar[type[BaseModel]] = NoOptions
    Params: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.kwargs = self.Kwargs.model_validate(model.engine_kwargs)

    async def start(self) -> None:
        """Load weights and start the backend. Called once before any request."""

    @abstractmethod
    def infer(self, inputs, params: BaseModel, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        """Run one request; yield one or more results. Raises ``core.errors.MMServeError``."""

    async def check_health(self) -> None:
        """Raise ``core.errors.NotReady`` if the engine cannot serve requests."""

    def stats(self) -> dict[str, Any]:
        """Counters of the backend's own state (e.g. requests it is still running)."""
        return {}

    async def stop(self) -> None:
        """Release the backend's resources."""


async def collect(results: AsyncIterator[EngineResult]) -> EngineResult:
    """Fold the chunks of a streamed inference into one result (text chunks are concatenated)."""
    chunks = [r async for r in results]
    if not chunks:
        raise RuntimeError("engine produced no result")
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    if all(isinstance(c.output, str) for c in chunks):
        output = "".join(c.output for c in chunks)
    else:
        output = [c.output for c in chunks]
    return EngineResult(output=output, finish_reason=last.finish_reason, usage=last.usage)
