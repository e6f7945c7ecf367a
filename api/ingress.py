"""The ingress deployment: one Ray Serve replica that serves the HTTP API (:mod:`api.app`) and
runs, in its own process, every step that no deployment of its own hosts."""

from __future__ import annotations

from ray import serve

from api.app import create_app
from core import metrics
from core.config import ServerConfig
from pipelines.deployments import Route, pipeline_for
from pipelines.router import ModelRouter


@serve.deployment
@serve.ingress()
class Ingress:
    """The single HTTP entry: the FastAPI app of :mod:`api.app` over the model router."""

    async def __init__(self, server: ServerConfig, routes: list[Route]) -> None:
        self.server = server
        metrics.configure(server.metrics)
        self.exposed = await metrics.expose() if server.metrics else None
        self.router = ModelRouter([pipeline_for(r) for r in routes])
        await self.router.start()

    async def check_health(self) -> None:
        # Engines placed inline live in this replica: if one is dead, Serve must restart it.
        await self.router.check_local_engines()

    async def _scrape(self, extra: list) -> bytes:
        return await metrics.scrape_cluster(self.exposed.app, self.server.status_timeout_s, extra)

    def __serve_build_asgi_app__(self):
        return create_app(self.router, self.server, echo_request_id=False, scrape=self._scrape)

    def __del__(self) -> None:
        if getattr(self, "exposed", None) is not None:  # None too if __init__ failed early
            self.exposed.close()
