"""Dynamic batching for engines whose model runs a batch as cheaply as one item (torch models).

Concurrent requests queue in the engine; one loop takes the oldest ``max_batch_size`` of them
each time the model is free (waiting at most ``batch_wait_timeout_s`` from the first for a batch
to fill) and runs them in a worker thread, so the replica's event loop keeps accepting requests
meanwhile. A batch is formed only when the model is free: everything that arrived while the last
one ran is there to fill it. (Ray Serve's ``@serve.batch`` forms the next batch while the last
still runs; under a closed loop at twice the batch size that settled into a cycle of batches of
16, 3, 3 and 10 for the vision engine, BENCHMARKS.md "Media throughput with batching".) A request
cancelled while it waits (its client gone, its deadline passed) leaves the queue unrun. The same
object batches inside its own engine deployment or inline in the ingress replica. For batching
to happen across a handle, the engine deployment's ``max_ongoing_requests`` must be at least
``max_batch_size``.

``instances`` (Triton's instance count) lets that many batches run at once, each in a worker
thread of its own, over the same weights; the model is "free" when one of them is. On a CPU,
instances of one torch thread each keep the cores busier than one batch split over as many
threads: the threads of a split batch wait for each other at every layer, so whenever another
process (the ingress, Ray, a client) takes one core, the batch on the other waits too.
"""

from __future__ import annotations

import asyncio
import collections
import time
from abc import abstractmethod
from typing import Any, AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from core import metrics
from core.errors import MMServeError
from core.protocol import EngineResult, MediaPayload, RequestContext
from engines.base import Engine, P

#: a request waiting for a batch: its payload, params, arrival time and the future of its output
_Queued = tuple[MediaPayload, P, float, asyncio.Future]


class BatchKwargs(BaseModel):
    """``engine_kwargs`` every batched engine takes."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=1024, description="Requests run together at most.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10,
                                        description="Longest wait for a batch to fill.")
    instances: int = Field(1, ge=1, le=64, description="Batches run at once, each in a worker "
                           "thread of its own (Triton's instance count).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads of each "
                                      "instance's batch (default: torch's, which Ray sets from the "
                                      "replica's num_cpus, divided by instances).")


class BatchedEngine(Engine[P]):
    """Base of batched engines: subclasses implement :meth:`load` and :meth:`run_batch`, and
    name their ``Params`` both as the class attribute and as ``P`` (``BatchedEngine[VADParams]``),
    so that :meth:`run_batch` sees each request's params as that type."""

    Kwargs = BatchKwargs
    #: Most ``instances`` the model allows: 1 for a model that keeps state between calls.
    max_instances: int | None = None

    @classmethod
    def check_config(cls, model) -> list[tuple[str, str]]:
        """A replica must take ``max_batch_size`` requests at once, or no batch ever fills; a
        model with state between calls runs one batch at a time."""
        kw = model.options(cls.Kwargs)
        problems = []
        ongoing = model.deployment.engine.max_ongoing_requests
        if ongoing < kw.max_batch_size:
            problems.append(("deployment.engine.max_ongoing_requests",
                             f"{ongoing} is below engine_kwargs.max_batch_size ({kw.max_batch_size}): a "
                             f"replica would never hold a full batch; set it to {kw.max_batch_size} or more"))
        if cls.max_instances is not None and kw.instances > cls.max_instances:
            problems.append(("engine_kwargs.instances",
                             f"{kw.instances}: engine {model.engine!r} runs at most {cls.max_instances} "
                             "batch at a time (its model keeps state between calls)"))
        return problems

    def __init__(self, model) -> None:
        super().__init__(model)
        self.batches = 0
        self.items = 0
        # One queue per engine object: engines inline in one process never share a batch.
        self._queue: collections.deque[_Queued[P]] = collections.deque()
        self._arrived = asyncio.Event()  # set by each request queued
        self._runner: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()  # batches running, at most kwargs.instances

    async def start(self) -> None:
        threads, instances = self.kwargs.torch_threads, self.kwargs.instances
        if threads or instances > 1:
            import torch

            torch.set_num_threads(threads or max(1, torch.get_num_threads() // instances))
        await asyncio.to_thread(self.load)

    @abstractmethod
    def load(self) -> None:
        """Load the model (runs in a worker thread, once)."""

    @abstractmethod
    def run_batch(self, items: list[tuple[MediaPayload, P]]) -> list[Any]:
        """Run the model on a batch of ``(payload, params)``; one output per item, in order.
        An item's output may be an ``MMServeError`` to fail that request alone."""

    async def infer(self, inputs: MediaPayload, params: P, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        done = asyncio.get_running_loop().create_future()
        self._queue.append((inputs, params, time.perf_counter(), done))
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._batches())
        output = await done  # cancelled with this request: the loop then skips it
        if isinstance(output, MMServeError):
            raise output
        yield EngineResult(output=output, finish_reason="stop", info=inputs.info)

    def _waiting(self) -> int:
        """Requests queued and still wanted (cancelled ones are dropped)."""
        while self._queue and self._queue[0][3].done():
            self._queue.popleft()
        return sum(not done.done() for *_, done in self._queue)

    async def _batches(self) -> None:
        """Start batches while requests wait, each when an instance is free; ends when the
        queue is empty (``infer`` starts it again; batches still running finish by themselves)."""
        size, wait_s = self.kwargs.max_batch_size, self.kwargs.batch_wait_timeout_s
        while waiting := self._waiting():
            if len(self._running) >= self.kwargs.instances:
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            if wait_s and waiting < size:  # the model is free: a short wait to fill it
                deadline = time.perf_counter() + wait_s
                while (left := deadline - time.perf_counter()) > 0 and self._waiting() < size:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch: list[_Queued[P]] = []
            while self._queue and len(batch) < size:
                item = self._queue.popleft()
                if not item[3].done():
                    batch.append(item)
            if batch:
                task = asyncio.create_task(self._run_one(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _run_one(self, batch: list[_Queued[P]]) -> None:
        """One batch in a worker thread; each request's future gets its output, or the error
        that failed the whole batch."""
        if metrics.ENABLED:
            now = time.perf_counter()
            model_id = self.model.model_id
            metrics.series(metrics.BATCH_SIZE, model_id).observe(len(batch))
            wait = metrics.series(metrics.BATCH_WAIT, model_id)
            for _, _, arrived, _ in batch:
                wait.observe(now - arrived)
        try:
            outputs = await asyncio.to_thread(self._run, [(payload, params) for payload, params, _, _ in batch])
            self.batches += 1
            self.items += len(batch)
        except Exception as err:  # the model failed the batch: each of its requests gets the error
            outputs = [err] * len(batch)
        for (*_, done), output in zip(batch, outputs):
            if done.done():  # cancelled while its batch ran
                continue
            if isinstance(output, Exception) and not isinstance(output, MMServeError):
                done.set_exception(output)
            else:
                done.set_result(output)

    def _run(self, items: list[tuple[MediaPayload, P]]) -> list[Any]:
        import torch

        with torch.inference_mode():  # at most kwargs.instances batches at a time (_batches)
            return self.run_batch(items)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items,
                "mean_batch_size": round(self.items / self.batches, 2) if self.batches else 0.0}
