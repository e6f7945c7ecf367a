"""The router: finds a request's pipeline by ``model_id``. It lives in the ingress replica."""

from __future__ import annotations

import asyncio
from typing import Iterator

from core.errors import ModelNotFound
from pipelines.runner import Pipeline


class ModelRouter:
    """Every served model's :class:`~pipelines.runner.Pipeline`, by ``model_id``."""

    def __init__(self, pipelines: list[Pipeline]) -> None:
        self.pipelines = {p.model.model_id: p for p in pipelines}

    async def start(self) -> None:
        """Start the steps that run in this process (inline engines, local nodes)."""
        await asyncio.gather(*(p.start() for p in self.pipelines.values()))

    def get(self, model_id: str) -> Pipeline:
        """The model's pipeline; raises ModelNotFound listing the served ids."""
        try:
            return self.pipelines[model_id]
        except KeyError:
            known = ", ".join(sorted(self.pipelines))
            raise ModelNotFound(f"unknown model_id {model_id!r}; served: {known}",
                                model_id=model_id) from None

    def __iter__(self) -> Iterator[Pipeline]:
        return iter(self.pipelines.values())

    async def check_local_engines(self) -> None:
        """Raise NotReady if an engine running in this process is unhealthy."""
        for p in self.pipelines.values():
            await p.engine.check_local()

    async def statuses(self, timeout_s: float) -> dict[str, str]:
        """Every model's status, probed concurrently within ``timeout_s``."""
        ids = list(self.pipelines)
        found = await asyncio.gather(*(self.pipelines[i].status(timeout_s) for i in ids))
        return dict(zip(ids, found))
