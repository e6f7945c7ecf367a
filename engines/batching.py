"""Dynamic batching for engines whose model runs a batch as cheaply as one item (torch models).

Concurrent requests are gathered with Ray Serve's ``@serve.batch`` (up to ``max_batch_size``,
waiting at most ``batch_wait_timeout_s`` for more), and each batch runs in a worker thread so
the replica's event loop keeps accepting requests meanwhile. The same object batches inside its
own engine deployment or inline in the ingress replica. For batching to happen across a handle,
the engine deployment's ``max_ongoing_requests`` must be at least ``max_batch_size``.
"""

from __future__ import annotations

import asyncio
import time
from abc import abstractmethod
from typing import Any, AsyncIterator

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from core import metrics
from core.errors import MMServeError
from core.protocol import EngineResult, MediaPayload, RequestContext
from engines.base import Engine


class BatchKwargs(BaseModel):
    """``engine_kwargs`` every batched engine takes."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=1024, description="Requests run together at most.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10,
                                        description="Longest wait for a batch to fill.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: "
                                      "torch's, which Ray sets from the replica's num_cpus).")


class BatchedEngine(Engine):
    """Base of batched engines: subclasses implement :meth:`load` and :meth:`run_batch`."""

    Kwargs = BatchKwargs

    @classmethod
    def check_config(cls, model) -> list[tuple[str, str]]:
        """A replica must take ``max_batch_size`` requests at once, or no batch ever fills."""
        batch = model.options(cls.Kwargs).max_batch_size
        ongoing = model.deployment.engine.max_ongoing_requests
        if ongoing < batch:
            return [("deployment.engine.max_ongoing_requests",
                     f"{ongoing} is below engine_kwargs.max_batch_size ({batch}): a replica would "
                     f"never hold a full batch; set it to {batch} or more")]
        return []

    def __init__(self, model) -> None:
        super().__init__(model)
        self.batches = 0
        self.items = 0
        # Decorated per instance: @serve.batch on the class would give every engine in a process
        # (inline placements) one shared queue, mixing models in a batch.
        self._batch = serve.batch(max_batch_size=self.kwargs.max_batch_size,
                                  batch_wait_timeout_s=self.kwargs.batch_wait_timeout_s)(self._run_async)
        # Set while no batch runs. serve.batch (Ray 2.60) forms the next batch while the last one
        # still runs (it then waits for its turn), so under load it would form many small ones;
        # requests wait here while the model is busy, and form one full batch when it is free.
        self._model_free = asyncio.Event()
        self._model_free.set()

    async def start(self) -> None:
        if self.kwargs.torch_threads:
            import torch

            torch.set_num_threads(self.kwargs.torch_threads)
        await asyncio.to_thread(self.load)

    @abstractmethod
    def load(self) -> None:
        """Load the model (runs in a worker thread, once)."""

    @abstractmethod
    def run_batch(self, items: list[tuple[MediaPayload, BaseModel]]) -> list[Any]:
        """Run the model on a batch of ``(payload, params)``; one output per item, in order.
        An item's output may be an ``MMServeError`` to fail that request alone."""

    async def infer(self, inputs: MediaPayload, params: BaseModel, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        arrived = time.perf_counter()
        await self._model_free.wait()
        output = await self._batch((inputs, params, arrived))
        if isinstance(output, MMServeError):
            raise output
        yield EngineResult(output=output, finish_reason="stop", info=inputs.info)

    async def _run_async(self, items: list[tuple[MediaPayload, BaseModel, float]]) -> list[Any]:
        self._model_free.clear()
        if metrics.ENABLED:
            now = time.perf_counter()
            model_id = self.model.model_id
            metrics.series(metrics.BATCH_SIZE, model_id).observe(len(items))
            wait = metrics.series(metrics.BATCH_WAIT, model_id)
            for *_, arrived in items:
                wait.observe(now - arrived)
        try:
            return await asyncio.to_thread(self._run, [(payload, params) for payload, params, _ in items])
        finally:
            self._model_free.set()

    def _run(self, items):
        import torch

        with torch.inference_mode():  # one batch at a time: serve.batch's max_concurrent_batches=1
            outputs = self.run_batch(items)
        self.batches += 1
        self.items += len(items)
        return outputs

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items,
                "mean_batch_size": round(self.items / self.batches, 2) if self.batches else 0.0}
