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


def from_args(args: dict) -> Application:
    """Serve's application builder for an exported config (``import_path:
    apps.builder:from_args``, ``args: {config: ...}``, see ``apps.export``): the config is
    validated again here, with the launcher's messages, and built as the launcher builds it,
    with the API keys of ``server.api_keys_env`` in this process's environment added."""
    from apps.config import with_env_api_keys
    from core.validate import validate_config

    if not isinstance(args, dict) or not isinstance(args.get("config"), dict):
        raise ValueError("args: expected {config: <the composed config>} (python -m apps.export writes it)")
    return build_app(with_env_api_keys(validate_config(args["config"])))


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
