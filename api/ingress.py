"""The ingress deployment: one Ray Serve replica that serves the HTTP API (:mod:`api.app`) and
runs, in its own process, every step that no deployment of its own hosts.

Its set of models is its ``user_config`` (``{"routes": [RouteSpec, ...]}`` as JSON), which Serve
hands to :meth:`Ingress.reconfigure` at start and again, in place, whenever it changes: the
launcher's ``--update`` and ``serve deploy`` of a changed file add and remove models that way,
without restarting this replica or the other models' deployments.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from api.app import create_app
from core import cpus, internals, metrics, tracing
from core.config import ServerConfig
from pipelines.deployments import RouteSpec, deployment_name, follow_deployments, pipeline_for, step_app_name
from pipelines.router import ModelRouter

logger = logging.getLogger("mmserve.ingress")


@serve.deployment
@serve.ingress()
class Ingress:
    """The single HTTP entry: the FastAPI app of :mod:`api.app` over the model router."""

    # Serve awaits an async __init__ of a deployment class; Python's type rules know no such thing.
    async def __init__(self, server: ServerConfig) -> None:  # type: ignore[misc]
        cpus.for_models()  # it runs models' steps (and engines' frontends) as a model's replica does
        self.server = server
        self.app_name = serve.get_replica_context().app_name  # its models' steps' apps are named after it
        tracing.setup("ingress")  # before its models' engines: a backend's spans go out with ours
        metrics.configure(server.metrics)
        self.exposed = await metrics.expose() if server.metrics else None
        self.router = ModelRouter([])
        self.configured = False
        self.update_error: str | None = None

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve these models from now on (see :meth:`pipelines.router.ModelRouter.update`): a
        removed model's requests in flight finish first (within ``server.max_request_timeout_s``,
        which no request outlives).

        The first set starts in the background (``ModelRouter.begin``): this replica answers
        at once, each model takes requests once it is up, and one that fails to start answers
        503 naming why while the others serve (:meth:`model_states` says which is which). A
        replica other than the first (Serve's rank above 0), or one that starts while another
        of this ingress serves (a replacement, or one added by scaling), answers only once each
        of its models is ready or failed, so that it takes no requests it would refuse. A first
        set that cannot even be built (a step this node cannot import) fails the replica.

        A later set is applied whole or not at all: one that fails leaves the models served as
        they were, and the replica up: a model that cannot load must not take the HTTP entry
        of every other model down with it. What went wrong is :meth:`last_update_error` until
        the next update (the launcher's ``--update`` asks, reports it and puts the previous set
        back)."""
        try:
            specs = [RouteSpec.model_validate(r) for r in config.get("routes", [])]
            if not self.configured:
                # the first set starts behind this replica's back: it answers from now on
                self.router.begin(specs, self._pipeline, self._follow, self.server.slow_starts_at_once)
                self.configured = True
                if self._rank() > 0 or await asyncio.to_thread(self._a_peer_serves):
                    # not the first replica, or a replacement beside one that serves: Serve puts
                    # it in HAProxy's rotation once this returns, and there it would answer 503
                    # 'starting' (quickly, so drawing more requests) while another serves them
                    await self.router.settled()
                    logger.info("every model settled here; this replica joins the others")
                return
            await self.router.update(specs, self._pipeline, self.server.max_request_timeout_s)
        except Exception as err:
            if not self.configured:
                raise
            logger.exception("update refused; still serving %s", sorted(p.model.model_id for p in self.router))
            self.update_error = f"{type(err).__name__}: {err}"
            return
        self.configured = True
        self.update_error = None

    @staticmethod
    def _rank() -> int:
        """This replica's rank among the ingress's replicas (Serve's; 0 where it has none, or
        outside a replica)."""
        try:
            rank = getattr(serve.get_replica_context(), "rank", 0)
        except Exception:  # not in a Serve replica (an in-process app)
            return 0
        return int(getattr(rank, "rank", rank) or 0)

    def _a_peer_serves(self) -> bool:
        """Whether another replica of this ingress is already running (this one is not yet)."""
        try:
            app = internals.serve_applications().get(self.app_name)
        except Exception:  # the controller busy: answer at once, as a first replica does
            logger.warning("could not ask Serve for this ingress's other replicas", exc_info=True)
            return False
        ingress = app.deployments.get("ingress") if app is not None else None
        return ingress is not None and ingress.replica_states.get("RUNNING", 0) > 0

    async def _follow(self, pipelines: list) -> None:
        await follow_deployments(self.app_name, pipelines)

    def model_states(self) -> dict[str, dict[str, Any]]:
        """Each model's start-up state (``ModelRouter.states``), for the launcher's progress."""
        return self.router.states()

    def last_update_error(self) -> str | None:
        """Why the last change of models failed (None: it was applied)."""
        return self.update_error

    async def stats(self, model_id: str) -> dict[str, Any]:
        """``model_id``'s engine counters (``Engine.stats``, e.g. the requests its backend still runs),
        for tests and operators through a Serve handle."""
        return await self.router.get(model_id).stats()

    def _pipeline(self, spec: RouteSpec):
        def handle_of(step: str):
            model_id = spec.model.model_id
            return internals.deployment_handle(deployment_name(model_id, step),
                                               step_app_name(self.app_name, model_id, step))

        return pipeline_for(spec, handle_of)

    async def check_health(self) -> None:
        # Engines placed inline live in this replica: if one is dead, Serve must restart it.
        await self.router.check_local_engines()

    async def _scrape(self, extra: list) -> bytes:
        assert self.exposed is not None  # with metrics off, GET /metrics refuses before it scrapes
        return await metrics.scrape_cluster(self.exposed.app, self.server.status_timeout_s, extra)

    def __serve_build_asgi_app__(self):
        return create_app(self.router, self.server, echo_request_id=False, scrape=self._scrape)

    def __del__(self) -> None:
        exposed = getattr(self, "exposed", None)  # None too if __init__ failed early
        if exposed is not None:
            exposed.close()
        tracing.flush()  # the spans of its last requests
