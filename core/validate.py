"""Validate a composed config once, before anything starts.

:func:`validate_config` takes the plain dict that Hydra composed and returns an
:class:`~core.config.AppConfig` in which every model's deployment is merged with the profile,
its engine is resolved, and its ``engine_kwargs``/``params`` are checked by the engine's own
schema. Any problem raises :class:`ConfigError`, which lists every problem as a dotted key
and what was expected.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from pydantic import BaseModel, ValidationError

from core.config import AppConfig, DeploymentOptions, DeploymentProfile, ServerConfig
from core.registry import engine_class, engine_of, node_class


class ConfigError(Exception):
    """The config is invalid. ``problems`` holds ``(dotted.key, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [f"  {key}: {msg}" for key, msg in problems]
        super().__init__("invalid config:\n" + "\n".join(lines))


def _dotted(prefix: str, loc: Iterable[Any]) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in loc]
    return ".".join(parts)


def _pydantic_problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {e['input']!r})"
        problems.append((_dotted(prefix, e["loc"]), msg))
    return problems


def check_with(schema: type[BaseModel], data: dict, prefix: str) -> list[tuple[str, str]]:
    """The problems of ``data`` against ``schema``, as ``(dotted key under prefix, message)``
    pairs for :class:`ConfigError` (none: it is valid). For sections outside the served
    config too (``apps.bench_config``'s ``load`` and ``bench``)."""
    try:
        schema.model_validate(data)
    except ValidationError as err:
        return _pydantic_problems(err, prefix)
    return []


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _with_model_deployments(raw: dict) -> dict:
    """Each model's ``deployment`` becomes the profile's placement/engine/node + its overrides."""
    raw = copy.deepcopy(raw)
    profile = raw.get("deployment") or {}
    base = {k: profile[k] for k in ("placement", "engine", "node") if k in profile}
    for model in (raw.get("model") or {}).values():
        if isinstance(model, dict):
            override = model.get("deployment") or {}
            model["deployment"] = _merge(base, override) if isinstance(override, dict) else override
    return raw


T = TypeVar("T")


def _lookup(loader: Callable[[str], T], name: str, key: str, problems: list[tuple[str, str]]) -> T | None:
    """The registered class called ``name``, or None with a problem recorded at ``key``."""
    try:
        return loader(name)
    except KeyError as e:
        problems.append((key, e.args[0]))
        return None


def validate_config(raw: dict) -> AppConfig:
    """Validate a composed config dict; returns the resolved :class:`AppConfig`.

    Raises:
        ConfigError: listing each invalid key with what was expected.
    """
    try:
        cfg = AppConfig.model_validate(_with_model_deployments(raw))
    except ValidationError as err:
        raise ConfigError(_pydantic_problems(err)) from None

    problems: list[tuple[str, str]] = []
    for name, pipeline in cfg.pipeline.items():
        for stage in ("preprocess", "postprocess"):
            spec = getattr(pipeline, stage)
            key = f"pipeline.{name}.{stage}"
            node_cls = _lookup(node_class, spec.name, f"{key}.name", problems)
            if node_cls is not None:
                problems += check_with(node_cls.Kwargs, spec.kwargs, f"{key}.kwargs")
        _lookup(engine_class, pipeline.engine, f"pipeline.{name}.engine", problems)

    seen: dict[str, str] = {}
    adapters: dict[str, tuple] = {}
    for key, model in cfg.model.items():
        where = f"model.{key}"
        if model.model_id in seen:
            problems.append((f"{where}.model_id", f"duplicate model_id {model.model_id!r} "
                             f"(also model.{seen[model.model_id]}.model_id)"))
        seen.setdefault(model.model_id, key)
        pipe = cfg.pipeline.get(model.pipeline)
        if pipe is None:
            problems.append((f"{where}.pipeline", f"unknown pipeline {model.pipeline!r}; "
                             f"known: {', '.join(sorted(cfg.pipeline)) or 'none'}"))
            continue
        if pipe.modality is not None and model.modality != pipe.modality:
            problems.append((f"{where}.modality", f"{model.modality!r}, but pipeline {model.pipeline!r} "
                             f"serves {pipe.modality!r} models"))
        model.engine = model.engine or pipe.engine
        cls = _lookup(engine_class, model.engine, f"{where}.engine", problems)
        if cls is None:
            continue
        kwargs_problems = check_with(cls.Kwargs, model.engine_kwargs, f"{where}.engine_kwargs")
        problems += kwargs_problems
        problems += check_with(cls.Params, model.params, f"{where}.params")
        if not kwargs_problems:
            model.options(cls.Kwargs)  # resolved once: engines and nodes receive the typed object
            problems += [(f"{where}.{key}", msg) for key, msg in cls.check_config(model)]
            problems += _engine_options_problems(pipe, model, where)
            hosting = cls.hosting(model)
            problems += _placement_problems(hosting, model, where)
            adapters[key] = hosting.adapters

    for key, served in adapters.items():  # an adapter is served under its own model id
        for adapter in served:
            if adapter.name in seen:
                problems.append((f"model.{key}.engine_kwargs", f"adapter {adapter.name!r} has the model_id "
                                 f"of model.{seen[adapter.name]}: each served id names one model"))
            seen.setdefault(adapter.name, key)

    if problems:
        raise ConfigError(problems)
    return cfg


def _engine_options_problems(pipe, model, where: str) -> list[tuple[str, str]]:
    """A node that reads engine options (``Node.engine_options``, a ``core.protocol``
    Protocol) needs a model whose engine's options have them."""
    options, problems = model.options(engine_of(model).Kwargs), []
    for stage in ("preprocess", "postprocess"):
        name = getattr(pipe, stage).name
        try:
            needs = node_class(name).engine_options
        except KeyError:
            continue  # reported under the pipeline
        if needs is not None and not isinstance(options, needs):
            problems.append((f"{where}.engine", f"engine {model.engine!r} has no options that the "
                             f"{stage} node {name!r} reads ({', '.join(needs.__annotations__)})"))
    return problems


def _placement_problems(hosting, model, where: str) -> list[tuple[str, str]]:
    """What ``model``'s placement asks of its engine's :class:`~engines.base.Hosting`:
    ``remote_core`` needs an engine that declares a core of its own, and starts its core's
    actors for the one ingress replica's frontend."""
    opts = model.deployment.engine
    gpus = opts.ray_actor_options.num_gpus
    if hosting.devices > 1 and gpus > 0:
        where_gpus = f"{where}.deployment.engine.ray_actor_options.num_gpus"
        if gpus != 1:
            return [(where_gpus, f"{gpus:g}, but the engine drives {hosting.devices} GPUs together per "
                     "replica (a placement group of one-GPU bundles): set 1 (whole GPUs)")]
        if model.deployment.placement == "inline":
            return [(f"{where}.deployment.placement", f"inline: the ingress cannot reserve the "
                     f"{hosting.devices} GPUs the engine drives together; use engine or remote_core")]
    if model.deployment.placement != "remote_core":
        return []
    if not hosting.core:
        return [(f"{where}.deployment.placement", f"remote_core: engine {model.engine!r} declares no "
                 "core to run apart from its frontend (its hosting has no core actors); use engine")]
    if opts.autoscaling_config is not None or opts.num_replicas != 1:
        key = "autoscaling_config" if opts.autoscaling_config is not None else "num_replicas"
        return [(f"{where}.deployment.engine.{key}", "placement remote_core starts the engine's core "
                 "actors for the ingress replica's frontend; for replicas of the engine use placement engine")]
    return []


def validate_server(raw: dict) -> tuple[ServerConfig, DeploymentProfile]:
    """Validate the ``server`` and ``deployment`` sections of a composed config alone (what
    the ingress is built from; its models come apart), with :func:`validate_config`'s messages.

    Raises:
        ConfigError: listing each invalid key.
    """
    server, profile = raw.get("server") or {}, raw.get("deployment") or {}
    problems = check_with(ServerConfig, server, "server") + check_with(DeploymentProfile, profile, "deployment")
    problems += [(k, "unknown key") for k in sorted(set(raw) - {"server", "deployment", "pipeline", "model"})]
    if problems:
        raise ConfigError(problems)
    return ServerConfig.model_validate(server), DeploymentProfile.model_validate(profile)


@dataclass
class Demand:
    """Resources one deployment asks for when all its initial replicas run."""

    key: str
    replicas: int
    cpus: float
    gpus: float


def resource_demands(cfg: AppConfig) -> list[Demand]:
    """Every deployment the config creates, with the resources its replicas reserve (an
    ``remote_core`` model's core actors count as its engine's replicas: as many per ingress
    replica as its engine's hosting declares)."""

    def demand(key: str, opts: DeploymentOptions, replicas: int | None = None, hosting: Any = None) -> Demand:
        r = opts.min_replicas if replicas is None else replicas
        a = opts.ray_actor_options
        # an engine driving several GPUs reserves them all per replica
        gpus = a.num_gpus if hosting is None else hosting.gpus_per_replica(a.num_gpus)
        return Demand(key, r, r * a.num_cpus, r * gpus)

    out = [demand("deployment.ingress", cfg.deployment.ingress)]
    for key, model in cfg.model.items():
        dep = model.deployment
        hosting = engine_of(model).hosting(model)
        if dep.placement in ("engine", "split"):
            out.append(demand(f"model.{key}.deployment.engine", dep.engine, hosting=hosting))
        if dep.placement == "remote_core":
            out.append(demand(f"model.{key}.deployment.engine", dep.engine,
                              hosting.core_actors * cfg.deployment.ingress.min_replicas, hosting))
        if dep.placement == "split":
            out.append(demand(f"model.{key}.deployment.node (preprocess)", dep.node))
            out.append(demand(f"model.{key}.deployment.node (postprocess)", dep.node))
    return out


def check_resources(cfg: AppConfig, cpus: float, gpus: float) -> None:
    """Raise :class:`ConfigError` if the deployments ask for more CPUs or GPUs than available."""
    demands = resource_demands(cfg)
    problems = []
    for kind, have in (("cpus", cpus), ("gpus", gpus)):
        total = sum(getattr(d, kind) for d in demands)
        if total > have + 1e-9:
            asking = [d for d in demands if getattr(d, kind)]
            biggest = max(asking, key=lambda d: getattr(d, kind))
            parts = ", ".join(f"{d.key}: {getattr(d, kind):g}" for d in asking)
            problems.append((f"{biggest.key.split(' ')[0]}.ray_actor_options.num_{kind}",
                             f"deployments ask for {total:g} {kind.upper()[:-1]}s in total ({parts}) "
                             f"but the cluster has {have:g}"))
    if problems:
        raise ConfigError(problems)
