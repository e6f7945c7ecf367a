"""The Ray Serve deployments of a model's steps: engine servers and node servers, and the
:class:`RouteSpec` the ingress (``api.ingress``) builds each model's pipeline from.

Each hosts one of the plain objects of ``nodes``/``engines``.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, AsyncIterator, Awaitable, Callable

from pydantic import BaseModel
from ray import serve

from core import cpus, internals, metrics, tracing
from core.config import ModelConfig, NodeSpec, Strict
from core.deadline import iterate_within_deadline, within_deadline
from core.errors import MMServeError, NotReady
from core.protocol import Adapter, EngineResult, Refusal, RequestContext
from core.registry import engine_of, node_class
from engines.base import Engine, collect
from nodes.base import Node

logger = logging.getLogger("mmserve.deployments")

async def _refused_as_values(chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``chunks``, with an error of the vocabulary that ends them as a last :class:`Refusal`."""
    try:
        async for chunk in chunks:
            yield chunk
    except MMServeError as err:
        yield Refusal(err)


def check_node(model_id: str, steps: list[type[Engine] | type[Node]]) -> None:
    """Fail at start, with one message naming this node and each module missing, if a step
    hosted here (an engine or node class) needs what this node cannot import: on a cluster a
    node without the locked stack, or without FFmpeg's libraries for media, fails here rather
    than at its first request."""
    import importlib

    missing: dict[str, str] = {}
    for step in steps:
        for module in step.requires:
            if module not in missing:
                try:
                    importlib.import_module(module)
                except Exception as err:  # ImportError, or a library that fails to load (OSError)
                    missing[module] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if missing:
        import socket

        import ray

        node = ray.util.get_node_ip_address() if ray.is_initialized() else "local"
        raise RuntimeError(f"node {node} ({socket.gethostname()}) cannot run model {model_id!r}: "
                           + "; ".join(f"{m} ({e})" for m, e in missing.items())
                           + ". Install the locked stack there (requirements/lock-cpu.txt or lock-gpu.txt), "
                             "and FFmpeg's libraries for media models")


@serve.deployment
class EngineServer:
    """Hosts one model's engine; healthy while the engine's own check passes."""

    # Serve awaits an async __init__ of a deployment class; Python's type rules know no such thing.
    async def __init__(self, model: ModelConfig, metrics_on: bool = True) -> None:  # type: ignore[misc]
        cpus.for_models()
        self.model = model
        check_node(model.model_id, [engine_of(model)])
        tracing.setup(f"engine {model.model_id}")  # before the engine: its backend's spans go out with ours
        metrics.configure(metrics_on)
        self.exposed = await metrics.expose(model.model_id) if metrics_on else None
        self.engine = engine_of(model)(model)
        await self.engine.start()
        self.adapter_loads = 0  # adapters this replica took on (each time Serve's multiplexing did)
        self._hold = self._holder(engine_of(model).hosting(model).adapter_slots)

    def _holder(self, slots: int) -> Callable[[Adapter], Awaitable[None]] | None:
        """With adapters, Serve's model multiplexing: each replica tells Serve's routers which
        adapters it holds (the ``slots`` it used last), and a request for one (its handle
        call's ``multiplexed_model_id``, ``pipelines.stages.RemoteEngine``) goes to a replica
        holding it, else, when those are busy, to the replica holding fewest."""
        if not slots:
            return None
        named: dict[str, Adapter] = {}

        async def load(name: str) -> Adapter:
            await self.engine.load_adapter(named[name])
            self.adapter_loads += 1
            return named[name]

        held = serve.multiplexed(max_num_models_per_replica=slots)(load)

        async def hold(adapter: Adapter) -> None:
            named[adapter.name] = adapter  # the newest path of the name: the one to load
            await held(adapter.name)
        return hold

    async def _held(self, chunks: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        """``chunks`` once the request's adapter, if any, is held here."""
        if ctx.adapter is not None and self._hold is not None:
            await self._hold(ctx.adapter)
        async for chunk in chunks:
            yield chunk

    # Errors of the vocabulary go back as Refusal values (see core.protocol.Refusal).

    async def generate(self, payload: Any, params: BaseModel, ctx: RequestContext) -> EngineResult | Refusal:
        try:
            with tracing.step("engine", ctx):
                chunks = self._held(self.engine.infer(payload, params, ctx), ctx)
                return await within_deadline(collect(chunks), ctx)
        except MMServeError as err:
            return Refusal(err)

    async def stream(self, payload: Any, params: BaseModel, ctx: RequestContext) -> AsyncIterator[Any]:
        chunks = tracing.chunks("engine", lambda: self._held(self.engine.infer(payload, params, ctx), ctx), ctx)
        async for chunk in _refused_as_values(iterate_within_deadline(chunks, ctx)):
            yield chunk

    async def openai(self, route: str, body: dict, ctx: RequestContext) -> AsyncIterator[Any]:
        chunks = tracing.chunks("engine", lambda: self._held(self.engine.openai(route, body, ctx), ctx), ctx)
        async for chunk in _refused_as_values(iterate_within_deadline(chunks, ctx)):
            yield chunk

    async def model_card(self) -> dict[str, Any]:
        return await self.engine.model_card()

    def stats(self) -> dict[str, Any]:
        """The engine's counters, this replica's id, and the adapters it took on."""
        replica = serve.get_replica_context().replica_tag
        return {**self.engine.stats(), "replica": replica, "adapter_loads": self.adapter_loads}

    async def status(self) -> str:
        try:
            await self.engine.check_health()
        except NotReady as err:
            return f"unhealthy: {err.message}"
        return "ready"

    async def check_health(self) -> None:
        # Serve restarts a replica whose check raises.
        await self.engine.check_health()

    async def __del__(self) -> None:
        exposed = getattr(self, "exposed", None)  # None too if __init__ failed early
        if exposed is not None:
            exposed.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.stop()
        tracing.flush()  # the spans of its last requests, and its backend's


@serve.deployment
class NodeServer:
    """Hosts one pre- or postprocess node (``placement: split``)."""

    # Serve awaits an async __init__ of a deployment class; Python's type rules know no such thing.
    async def __init__(self, spec: NodeSpec, model: ModelConfig, metrics_on: bool = True) -> None:  # type: ignore[misc]
        cpus.for_models()
        check_node(model.model_id, [node_class(spec.name)])
        tracing.setup(f"node {spec.name} {model.model_id}")
        metrics.configure(metrics_on)
        self.exposed = await metrics.expose(model.model_id) if metrics_on else None
        self.node = node_class(spec.name)(spec.kwargs, model)
        await self.node.start()

    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        try:
            with tracing.step(ctx.stage, ctx):
                return await within_deadline(self.node(payload, ctx), ctx)
        except MMServeError as err:
            return Refusal(err)  # see core.protocol.Refusal

    def __del__(self) -> None:
        exposed = getattr(self, "exposed", None)  # None too if __init__ failed early
        if exposed is not None:
            exposed.close()
        tracing.flush()  # the spans of its last requests


#: how many deployments of its own each placement gives a model, by step
REMOTE_STEPS = {"inline": (), "remote_core": (), "engine": ("engine",),
                "split": ("preprocess", "engine", "postprocess")}


class RouteSpec(Strict):
    """What the ingress builds one model's pipeline from: the model and its two nodes. It is
    the ingress's ``user_config`` (a list of them, as JSON), so that Serve changes the set of
    models in place. Steps that :data:`REMOTE_STEPS` gives a deployment of their own are
    reached by name (:func:`step_app_name`); the others are built inside the ingress replica."""

    model: ModelConfig
    preprocess: NodeSpec
    postprocess: NodeSpec

    @property
    def remote_steps(self) -> tuple[str, ...]:
        return REMOTE_STEPS[self.model.deployment.placement]


def deployment_name(model_id: str, step: str) -> str:
    """A Serve deployment name for a model's step (model ids may hold characters Serve refuses)."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model_id)}.{step}"


def step_app_name(app_name: str, model_id: str, step: str) -> str:
    """The Serve application hosting a model's step of the application ``app_name``: one
    application per step, so that a model comes and goes without touching the others."""
    return f"{app_name}.{deployment_name(model_id, step)}"


def pipeline_for(spec: RouteSpec, handle_of: Callable[[str], Any] | None = None):
    """The :class:`~pipelines.runner.Pipeline` of a route: local steps built here, remote ones
    (``spec.remote_steps``) reached through ``handle_of(step)``."""
    from pipelines.runner import Pipeline
    from pipelines.stages import LocalEngine, LocalNode, RemoteEngine, RemoteNode

    m = spec.model
    remote = set(spec.remote_steps)
    if remote and handle_of is None:
        raise ValueError(f"model {m.model_id!r}: placement {m.deployment.placement} needs handles")
    local: list[type[Engine] | type[Node]] = [node_class(s.name) for step, s in
                                              (("preprocess", spec.preprocess), ("postprocess", spec.postprocess))
                                              if step not in remote]
    if "engine" not in remote:
        local.append(engine_of(m))
    handles = {step: handle_of(step) for step in remote} if handle_of is not None else {}

    def node(step: str, node_spec: NodeSpec):
        if step in remote:
            return RemoteNode(handles[step], m.model_id, m.deployment.node.scales_to_zero)
        return LocalNode(node_class(node_spec.name)(node_spec.kwargs, m))

    engine = (RemoteEngine(handles["engine"], m.model_id, m.deployment.engine.scales_to_zero)
              if "engine" in remote
              else LocalEngine(engine_of(m)(m)))
    # checked as the pipeline starts, off the event loop: an LLM engine's check imports its
    # backend (12 s), which held a starting ingress's answers back
    return Pipeline(m, node("preprocess", spec.preprocess), engine, node("postprocess", spec.postprocess),
                    spec=spec, check=functools.partial(check_node, m.model_id, local))


#: how often a starting ingress asks Serve's controller about its models' deployments
FOLLOW_PERIOD_S = 0.5


async def follow_deployments(app_name: str, pipelines: list[Any], period_s: float = FOLLOW_PERIOD_S) -> None:
    """Follow the deployments of ``pipelines``' remote steps (those of the ingress ``app_name``)
    through Serve's controller until each is running or failed, telling each pipeline
    (``Pipeline.waiting``, ``Pipeline.fail``): what Serve is doing with a step's replicas
    while it starts, and why it failed (the last line of Serve's message, the constructor's
    error) when Serve gives up on it."""
    import asyncio

    pending = {(p, step): step_app_name(app_name, p.model.model_id, step)
               for p in pipelines for step in p.spec.remote_steps}
    while pending:
        try:
            apps = await asyncio.to_thread(internals.serve_applications)
        except Exception as err:  # the controller busy or restarting: ask again
            logger.warning("Serve's status: %s", err)
            apps = {}
        for (p, step), name in list(pending.items()):
            app = apps.get(name)
            if app is None:
                continue
            if p.failure is not None:
                del pending[(p, step)]
            elif app.running:
                p.waiting(step, None)
                del pending[(p, step)]
            elif app.failed:
                # the deployment's message ends with its constructor's error; the application's
                # only says which deployment failed
                messages = [d.message for d in app.deployments.values() if d.message] + [app.message]
                p.fail(f"{step}: {_last_line(messages[0])}")
                logger.error("model %r failed to start (%s): %s", p.model.model_id, step, messages[0])
                await asyncio.gather(p.stop(), return_exceptions=True)
                del pending[(p, step)]
            else:
                p.waiting(step, _replicas_of(app) or app.status.lower())
        if pending:
            await asyncio.sleep(period_s)


def _replicas_of(app: internals.ApplicationState) -> str:
    """Serve's replica states of an application's deployments, e.g. ``1 replica starting``."""
    counts: dict[str, int] = {}
    for dep in app.deployments.values():
        for state, n in dep.replica_states.items():
            counts[state.lower()] = counts.get(state.lower(), 0) + n
    return ", ".join(f"{n} replica{'s' if n != 1 else ''} {state}" for state, n in counts.items())


def _last_line(message: str) -> str:
    """The last meaningful line of Serve's message of a failed deployment: its error."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "failed to deploy"
