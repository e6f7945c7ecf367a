"""``build_app(cfg)``: a validated config becomes one Ray Serve application.

The launcher, the tests and the benchmarks all call it, through ``apps.serving.served``.
"""

from __future__ import annotations

import re

from ray.serve import Application

from core.config import AppConfig
from api.ingress import Ingress
from pipelines.deployments import EngineServer, NodeServer, Route


def deployment_name(model_id: str, step: str) -> str:
    """A Serve deployment name for a model's step (model ids may hold characters Serve refuses)."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model_id)}.{step}"


def build_app(cfg: AppConfig) -> Application:
    """Bind the ingress and, per model, the deployments its placement asks for."""
    routes = []
    for model in cfg.model.values():
        pipe = cfg.pipeline[model.pipeline]
        dep = model.deployment
        route = Route(model=model, preprocess=pipe.preprocess, postprocess=pipe.postprocess)
        if dep.placement in ("engine", "split"):
            route.engine_handle = EngineServer.options(
                name=deployment_name(model.model_id, "engine"), **dep.engine.serve_options()
            ).bind(model, cfg.server.metrics)
        if dep.placement == "split":
            for step, spec in (("preprocess", pipe.preprocess), ("postprocess", pipe.postprocess)):
                setattr(route, f"{step}_handle", NodeServer.options(
                    name=deployment_name(model.model_id, step), **dep.node.serve_options()
                ).bind(spec, model, cfg.server.metrics))
        routes.append(route)
    return Ingress.options(name="ingress", **cfg.deployment.ingress.serve_options()).bind(cfg.server, routes)
