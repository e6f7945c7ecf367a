"""The router: finds a request's pipeline by ``model_id``. It lives in the ingress replica."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Iterator

from core.errors import ModelNotFound
from core.protocol import Adapter
from pipelines.runner import Pipeline

logger = logging.getLogger("mmserve.router")


class ModelRouter:
    """Every served model's :class:`~pipelines.runner.Pipeline`, by ``model_id``, and the
    adapters served under their own ids (``core.protocol.Adapter``): those of the models'
    configs, and those loaded at run time (``POST /v1/load_lora_adapter``), which this router
    keeps for as long as their base model is served."""

    def __init__(self, pipelines: list[Pipeline]) -> None:
        self.pipelines = {p.model.model_id: p for p in pipelines}
        self.adapters: dict[str, Adapter] = {a.name: a for p in pipelines for a in p.adapters}
        self.generation = 0  # bumped by each update: what caches of the model set key on
        self._starting: list[asyncio.Future] = []  # begin()'s start-ups (held: the loop keeps weak references)

    def begin(self, specs: list[Any], build: Callable[[Any], Pipeline],
              deployed: Callable[[list[Pipeline]], Awaitable[None]],
              slow_at_once: int | None = None) -> None:
        """Serve the models of ``specs`` from now on, each taking requests once it is up: the
        first set of a starting ingress, which answers meanwhile (``/health``, ``/v1/models``
        with each model's state, 503 for a model still starting). Each pipeline's local steps
        start in the background, beside ``deployed(pipelines)``, which follows the models'
        own deployments (``Pipeline.waiting``, ``Pipeline.fail``). A model that fails to start
        stops what it started and answers 503 naming why; the others are not affected.

        With ``slow_at_once`` (``server.slow_starts_at_once``), the models whose engine starts
        slowly (``Pipeline.slow_start``) wait their turn (``Pipeline.turn``): they start once
        the others are ready or failed, in ``specs``' order, that many at a time, so that on a
        few cores the quick models serve within seconds and each slow one is up sooner than
        if all shared the cores. Whoever deploys their remote steps waits for the turn too
        (:meth:`states`, ``waiting_turn``)."""
        fresh = [build(s) for s in specs]
        for p in fresh:
            p.created = time.monotonic()
            for step in p.spec.remote_steps:  # deployed() tells when each is up
                p.waiting(step, "deploying")
        self.pipelines = {p.model.model_id: p for p in fresh}
        self.adapters = {a.name: a for p in fresh for a in p.adapters}
        self.generation += 1
        slow = [p for p in fresh if p.slow_start] if slow_at_once else []
        quick = [p for p in fresh if p not in slow]
        self._starting = [asyncio.create_task(self._bring_up(p), name=f"start {p.model.model_id}")
                          for p in quick]
        if slow:
            for p in slow:
                p.turn = "after the models that start quickly"
            self._starting.append(asyncio.create_task(self._in_turns(slow, quick, slow_at_once or 1),
                                                      name="start in turns"))
        self._starting.append(asyncio.ensure_future(deployed(fresh)))

    async def _in_turns(self, slow: list[Pipeline], quick: list[Pipeline], at_once: int) -> None:
        await asyncio.gather(*(p.settled.wait() for p in quick))
        running: dict[asyncio.Task, Pipeline] = {}
        for i, p in enumerate(slow):
            if self.pipelines.get(p.model.model_id) is not p:
                continue  # replaced by an update meanwhile
            while len(running) >= at_once:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
            p.turn = None
            self._starting.append(asyncio.create_task(self._bring_up(p), name=f"start {p.model.model_id}"))
            running[asyncio.create_task(p.settled.wait())] = p
            after = "after " + ", ".join(sorted(q.model.model_id for q in running.values()))
            for q in slow[i + 1:]:
                q.turn = after
        await asyncio.gather(*running)  # the last turns' waits end with them, not left pending

    async def _bring_up(self, pipeline: Pipeline) -> None:
        try:
            await pipeline.start()
        except Exception:
            logger.exception("model %r failed to start; the others are served", pipeline.model.model_id)
            await asyncio.gather(pipeline.stop(), return_exceptions=True)

    async def settled(self) -> None:
        """Return once every model is ready or has failed to start."""
        await asyncio.gather(*(p.settled.wait() for p in self.pipelines.values()))

    def states(self) -> dict[str, dict[str, Any]]:
        """Each model's start-up state (``Pipeline.state``), what it waits for or why it failed,
        the seconds it took to be ready, and whether it still waits its turn to start."""
        return {m: {"state": p.state, "detail": p.state_detail, "ready_after_s": p.ready_after_s,
                    "waiting_turn": p.turn is not None}
                for m, p in self.pipelines.items()}

    async def update(self, specs: list[Any], build: Callable[[Any], Pipeline], drain_timeout_s: float) -> None:
        """Serve the models of ``specs`` (RouteSpecs) from now on, in place: a model whose spec
        is unchanged keeps its pipeline; a new or changed one is built (``build``) and started
        before it takes requests; a removed or replaced pipeline takes no new request, and once
        the requests holding it have finished (at most ``drain_timeout_s``) its local steps stop.
        A failure to build or start leaves the served set as it was, and stops what this update
        started of it."""
        kept = {s.model.model_id: p for s in specs
                if (p := self.pipelines.get(s.model.model_id)) is not None and p.spec == s}
        fresh = [build(s) for s in specs if s.model.model_id not in kept]
        failures = [r for r in await asyncio.gather(*(p.start() for p in fresh), return_exceptions=True)
                    if isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(p.stop() for p in fresh), return_exceptions=True)
            raise failures[0]
        new = {p.model.model_id: p for p in fresh}
        retired = [p for p in self.pipelines.values() if p.model.model_id not in kept]
        self.pipelines = {s.model.model_id: kept.get(s.model.model_id) or new[s.model.model_id] for s in specs}
        # a kept model keeps the adapters loaded into it; a new or changed one has its config's
        self.adapters = {**{n: a for n, a in self.adapters.items() if a.base in kept},
                         **{a.name: a for p in fresh for a in p.adapters}}
        self.generation += 1
        if fresh or retired:
            logger.info("models now %s (started %s, retired %s)", sorted(self.pipelines),
                        sorted(p.model.model_id for p in fresh), sorted(p.model.model_id for p in retired))
        drained = await asyncio.gather(*(p.drained(drain_timeout_s) for p in retired))
        for p, done in zip(retired, drained):
            if not done:
                logger.warning("model %r: %d request(s) still running after %gs; its local steps stop now",
                               p.model.model_id, p.in_flight, drain_timeout_s)
        await asyncio.gather(*(p.stop() for p in retired))

    async def start(self) -> None:
        """Start the steps that run in this process (inline engines, local nodes)."""
        await asyncio.gather(*(p.start() for p in self.pipelines.values()))

    def get(self, model_id: str) -> Pipeline:
        """The model's pipeline (an adapter's: its base model's); raises ModelNotFound listing
        the served ids."""
        pipeline = self.pipelines.get(model_id)
        if pipeline is None and (adapter := self.adapters.get(model_id)) is not None:
            pipeline = self.pipelines.get(adapter.base)
        if pipeline is None:
            known = ", ".join(sorted([*self.pipelines, *self.adapters]))
            raise ModelNotFound(f"unknown model_id {model_id!r}; served: {known}",
                                model_id=model_id) from None
        return pipeline

    def add_adapter(self, adapter: Adapter) -> None:
        """Serve ``adapter`` (loaded into its base model's engine) under its own id from now on."""
        self.adapters[adapter.name] = adapter

    def remove_adapter(self, name: str) -> Adapter:
        """Stop serving the adapter ``name``; raises ModelNotFound, listing the adapters, if none."""
        try:
            return self.adapters.pop(name)
        except KeyError:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise ModelNotFound(f"The lora adapter {name!r} cannot be found (adapters: {known}).",
                                model_id=name, field="lora_name") from None

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
