"""A validated config becomes Ray Serve applications: the ingress's, and one per step of a model
that runs in a deployment of its own (``placement: engine``: the engine; ``split``: every node).

Models are separate applications so that one is added, changed or removed without touching the
others (see ``apps.serving.RaySession.update`` and ``serve deploy`` of ``apps.export``'s file):
the ingress reaches their deployments by name, and learns the set of models from its
``user_config``, which Serve changes in place.

The launcher, the tests and the benchmarks all call :func:`build_targets`, through
``apps.serving.served``; ``serve deploy`` calls :func:`ingress_from_args` and
:func:`step_from_args`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ray.serve import Application

from api.ingress import Ingress
from core import internals
from core.config import AppConfig, DeploymentOptions, ServerConfig
from core.registry import engine_of
from pipelines.deployments import EngineServer, NodeServer, RouteSpec, deployment_name, step_app_name

#: options of a deployment that Serve changes on running replicas (left out of its version)
IN_PLACE = frozenset({"num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
                      "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s",
                      "access_log"})

#: Serve holds a stopping ingress replica of an application open this long for load balancers
#: to deregister it. A step's application has no HTTP route, so its replicas stop without it
#: (5 s less at every removal, update and shutdown); the HTTP ingress keeps the server's value.
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


@dataclass(frozen=True)
class Target:
    """One Serve application to run: its name, what it is, and its HTTP prefix (None: none)."""

    name: str
    app: Application
    route_prefix: str | None = None
    model_id: str | None = None  # the model whose step it hosts (None: the ingress)


def route_specs(cfg: AppConfig) -> list[RouteSpec]:
    """Each model with its pipeline's nodes, in the config's order."""
    return [RouteSpec(model=m, preprocess=cfg.pipeline[m.pipeline].preprocess,
                      postprocess=cfg.pipeline[m.pipeline].postprocess) for m in cfg.model.values()]


def ingress_config(cfg: AppConfig) -> dict[str, Any]:
    """The ingress's ``user_config``: the models it serves (JSON)."""
    return {"routes": [s.model_dump(mode="json") for s in route_specs(cfg)]}


def _version(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _restart_fields(opts: DeploymentOptions) -> dict[str, Any]:
    return opts.model_dump(mode="json", exclude=set(IN_PLACE))


def step_version(spec: RouteSpec, step: str) -> str:
    """A step's deployment version: what its replicas were built from, less what Serve changes
    in place. Deployed again with the same version, the step's replicas keep running."""
    m = spec.model.model_dump(mode="json", exclude={"deployment"})
    dep = spec.model.deployment
    opts = dep.engine if step == "engine" else dep.node
    node = getattr(spec, step).model_dump(mode="json") if step != "engine" else None
    return _version(step, m, dep.placement, _restart_fields(opts), node)


def step_app(spec: RouteSpec, step: str, metrics_on: bool) -> Application:
    """The application of one model's step: an engine or node server, alone."""
    m = spec.model
    opts = (m.deployment.engine if step == "engine" else m.deployment.node).serve_options()
    if step == "engine":
        opts.update(gpu_group_options(m))
    env = opts["ray_actor_options"].setdefault("runtime_env", {}).setdefault("env_vars", {})
    env.setdefault(DRAIN_ENV, "0")
    cls = EngineServer if step == "engine" else NodeServer
    # @serve.deployment makes the class a Deployment (with .options); mypy keeps the class's type
    deployment = internals.pinned_version(
        cls.options(name=deployment_name(m.model_id, step), **opts),  # type: ignore[union-attr]
        step_version(spec, step))
    if step == "engine":
        return deployment.bind(m, metrics_on)
    return deployment.bind(getattr(spec, step), m, metrics_on)


def gpu_group_options(model) -> dict:
    """Serve's options that reserve the GPUs an engine replica drives together (its hosting's
    ``devices``) as one placement group per replica, the replica itself in the first bundle
    with no GPU of its own (the engine's first GPU worker takes that one); none where the
    replica reserves its ``num_gpus`` alone."""
    actor = model.deployment.engine.ray_actor_options
    bundles = engine_of(model).hosting(model).gpu_bundles(actor.num_cpus, actor.num_gpus, actor.resources)
    if bundles is None:
        return {}
    opts = model.deployment.engine.serve_options()["ray_actor_options"]
    return {"placement_group_bundles": bundles, "placement_group_strategy": "PACK",
            "ray_actor_options": {**opts, "num_gpus": 0}}


def ingress_app(server: ServerConfig, ingress: DeploymentOptions, user_config: dict | None) -> Application:
    """The ingress application; ``user_config`` (its models) is left out for ``serve deploy``,
    whose file sets it in the deployment's overrides."""
    opts = ingress.serve_options()
    if user_config is not None:
        opts["user_config"] = user_config
    # @serve.deployment makes the class a Deployment (with .options); mypy keeps the class's type
    deployment = internals.pinned_version(Ingress.options(name="ingress", **opts),  # type: ignore[attr-defined]
                                          _version("ingress", server.model_dump(mode="json"),
                                                   _restart_fields(ingress)))
    return deployment.bind(server)


def step_targets(cfg: AppConfig, app_name: str) -> list[Target]:
    """Every model's steps that run in deployments of their own, one application each."""
    return [Target(step_app_name(app_name, s.model.model_id, step), step_app(s, step, cfg.server.metrics),
                   model_id=s.model.model_id)
            for s in route_specs(cfg) for step in s.remote_steps]


def build_targets(cfg: AppConfig, app_name: str, route_prefix: str) -> list[Target]:
    """Every application of ``cfg`` served as ``app_name``: the models' steps, then the ingress
    at ``route_prefix`` (which starts last, once what it routes to is running)."""
    return [*step_targets(cfg, app_name),
            Target(app_name, ingress_app(cfg.server, cfg.deployment.ingress, ingress_config(cfg)), route_prefix)]


# --- serve deploy --------------------------------------------------------------------------

def _config_arg(args: dict, what: str) -> dict:
    if not isinstance(args, dict) or not isinstance(args.get("config"), dict):
        raise ValueError(f"args: expected {{config: <{what}>, ...}} (python -m apps.export writes it)")
    return args["config"]


def _validated(args: dict) -> AppConfig:
    from apps.config import with_env_api_keys
    from core.validate import validate_config

    return with_env_api_keys(validate_config(_config_arg(args, "the composed config")))


def ingress_from_args(args: dict) -> Application:
    """Serve's builder of the exported ingress application (``args: {config: ...}``: the
    config's ``server`` and ``deployment`` sections, see ``apps.export``), validated again here
    with the launcher's messages and with the API keys of ``server.api_keys_env`` in this
    process's environment added. Its models come from the file's ``user_config`` of ``ingress``,
    so that a changed set of models leaves the ingress's code version, and its replicas, as
    they are."""
    from apps.config import env_api_keys
    from core.validate import validate_server

    server, profile = validate_server(_config_arg(args, "the server and deployment sections"))
    return ingress_app(env_api_keys(server), profile.ingress, None)


def step_from_args(args: dict) -> Application:
    """Serve's builder of one exported model step (``args: {config: ..., model: key, step:
    engine|preprocess|postprocess}``; ``config`` holds that one model), validated again here."""
    cfg = _validated(args)
    key, step = args.get("model"), args.get("step")
    if key not in cfg.model:
        raise ValueError(f"args.model: {key!r} is not a model of args.config (has {sorted(cfg.model)})")
    (spec,) = [s for s in route_specs(cfg) if s.model is cfg.model[key]]
    if step not in spec.remote_steps:
        raise ValueError(f"args.step: {step!r} is not a step of {key!r} in its own deployment "
                         f"(placement {spec.model.deployment.placement}: {list(spec.remote_steps)})")
    return step_app(spec, step, cfg.server.metrics)
