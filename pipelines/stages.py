"""One interface over a pipeline step, whether it runs in this process or in another deployment.

:class:`~pipelines.runner.Pipeline` calls its steps through these adapters and never needs to
know where a step runs: placement is configuration (``deployment.placement``). What every
adapter offers is :class:`Step` (start, stop); nodes are called as :class:`NodeStep`, engines
as :class:`EngineStep`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncGenerator, Protocol

from pydantic import BaseModel

from core import internals, metrics, tracing
from core.errors import MMServeError, NotReady, Overloaded
from core.protocol import EngineResult, Refusal, RequestContext
from engines.base import Engine, collect
from nodes.base import Node


def overloaded(model_id: str) -> Overloaded:
    return Overloaded(f"model {model_id!r} is at capacity; retry shortly", model_id=model_id,
                      retry="overloaded")


def replica_unavailable(model_id: str) -> NotReady:
    """A model's replica is dead or unreachable and Serve is bringing up another."""
    return NotReady(f"model {model_id!r} is unavailable (its replica is restarting)",
                    model_id=model_id, retry="replica_unavailable")


ASSIGN_CHECK_S = 0.25


async def assigned(response, handle, model_id: str, scales_to_zero: bool = False) -> None:
    """Wait until Serve's router has given ``response`` (a call on ``handle``) to a replica.

    A router that finds a replica dead drops it and holds the call until a replacement is up:
    seconds for a light node, minutes for a model. Every ``ASSIGN_CHECK_S`` of waiting, the router
    is asked whether it still has a replica; if it has none, the call is cancelled and NotReady
    raised (503), unless the deployment scales to zero, where waiting for a replica to start
    is the point. A call queued behind busy replicas keeps waiting for its turn."""
    assignment = asyncio.ensure_future(internals.assignment(response))
    try:
        with metrics.queued(model_id):
            while not (await asyncio.wait({assignment}, timeout=ASSIGN_CHECK_S))[0]:
                if not scales_to_zero and internals.routable_replicas(handle) == 0:
                    raise replica_unavailable(model_id)
        assignment.result()
    except BaseException:
        assignment.cancel()
        response.cancel()
        raise


def unwrap(value: Any) -> Any:
    """A value from across a handle hop; a :class:`~core.protocol.Refusal` is raised."""
    if isinstance(value, Refusal):
        raise value.error
    return value


def remote_error(err: BaseException, model_id: str) -> BaseException:
    """Map what a Ray handle call raised to the error vocabulary (or leave it as it is)."""
    from ray import exceptions as rx
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = err.cause if isinstance(err, rx.RayTaskError) and err.cause is not None else err
    if isinstance(cause, MMServeError):
        return cause
    if isinstance(cause, BackPressureError):
        return overloaded(model_id)
    if isinstance(cause, (rx.RayActorError, DeploymentUnavailableError, rx.ActorUnavailableError)):
        return replica_unavailable(model_id)
    return cause


class Step(Protocol):
    """What a pipeline does with each of its steps, wherever it runs: :meth:`start` before the
    first request, :meth:`stop` once the model is removed (or its start failed)."""

    async def start(self) -> None:
        """Set the step up in this process (a remote step's deployment has started it)."""

    async def stop(self) -> None:
        """Release what the step holds in this process (inline engines, probe tasks)."""


class NodeStep(Step, Protocol):
    """A pre- or postprocess step: :class:`LocalNode` or :class:`RemoteNode`."""

    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        """The node's answer to one request's payload."""


class EngineStep(Step, Protocol):
    """An engine step: :class:`LocalEngine` or :class:`RemoteEngine`."""

    async def generate(self, payload: Any, params: BaseModel, ctx: RequestContext) -> EngineResult: ...

    def stream(self, payload: Any, params: BaseModel, ctx: RequestContext) -> AsyncGenerator[EngineResult, None]: ...

    def openai(self, route: str, body: dict, ctx: RequestContext) -> AsyncGenerator[Any, None]: ...

    async def model_card(self) -> dict[str, Any]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def check_local(self) -> None: ...

    async def status(self, timeout_s: float) -> str: ...


class LocalNode:
    """A node object living in this process."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def start(self) -> None:
        await self.node.start()

    async def stop(self) -> None:
        """Nothing to release: a node holds no task or backend of its own."""

    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        with tracing.step(ctx.stage, ctx):
            return await self.node(payload, ctx)


class RemoteNode:
    """A node hosted by a :class:`~pipelines.deployments.NodeServer` deployment."""

    def __init__(self, handle, model_id: str, scales_to_zero: bool = False) -> None:
        self.handle = handle
        self.model_id = model_id
        self.scales_to_zero = scales_to_zero

    async def start(self) -> None:
        """Nothing to do: the deployment started the node."""

    async def stop(self) -> None:
        """Nothing to release here: the node's deployment goes with its application."""

    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        response = self.handle.remote(payload, ctx)
        try:
            await assigned(response, self.handle, self.model_id, self.scales_to_zero)
            return unwrap(await response)
        except Exception as err:
            raise remote_error(err, self.model_id) from None


class Admission:
    """Serve's admission rule, for engines that run inside the ingress replica (where Serve's
    own per-deployment limits do not apply): at most ``max_ongoing`` requests at once, at most
    ``max_queued`` waiting (-1: unbounded), the rest refused at once with 503 and Retry-After."""

    def __init__(self, max_ongoing: int, max_queued: int, model_id: str) -> None:
        self.slots = asyncio.Semaphore(max_ongoing)
        self.max_queued = max_queued
        self.waiting = 0
        self.model_id = model_id

    @asynccontextmanager
    async def slot(self):
        if self.slots.locked():
            if 0 <= self.max_queued <= self.waiting:
                raise overloaded(self.model_id)
            self.waiting += 1
            try:
                with metrics.queued(self.model_id):
                    await self.slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.slots.acquire()
        try:
            yield
        finally:
            self.slots.release()


class LocalEngine:
    """An engine object living in this process, admitted by the model's engine limits."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started = False
        opts = engine.model.deployment.engine
        self.admission = Admission(opts.max_ongoing_requests, opts.max_queued_requests,
                                   engine.model.model_id)

    async def start(self) -> None:
        await self.engine.start()
        self.started = True

    async def stop(self) -> None:
        if self.started:
            self.started = False
            await self.engine.stop()

    async def generate(self, payload: Any, params: BaseModel, ctx: RequestContext) -> EngineResult:
        async with self.admission.slot():
            with tracing.step("engine", ctx):
                return await collect(self.engine.infer(payload, params, ctx))

    async def stream(self, payload: Any, params: BaseModel, ctx: RequestContext) -> AsyncGenerator[EngineResult, None]:
        async with self.admission.slot():
            async for chunk in tracing.chunks("engine", lambda: self.engine.infer(payload, params, ctx), ctx):
                yield chunk

    async def openai(self, route: str, body: dict, ctx: RequestContext) -> AsyncGenerator[Any, None]:
        async with self.admission.slot():
            async for chunk in tracing.chunks("engine", lambda: self.engine.openai(route, body, ctx), ctx):
                yield chunk

    async def model_card(self) -> dict[str, Any]:
        return await self.engine.model_card() if self.started else {}

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def check_local(self) -> None:
        """Raise NotReady if this in-process engine is unhealthy (the replica must restart)."""
        if self.started:
            await self.engine.check_health()

    async def status(self, timeout_s: float) -> str:
        if not self.started:
            return "starting"
        if self.engine.recovering:
            return "recovering"
        try:
            await asyncio.wait_for(self.engine.check_health(), timeout_s)
        except Exception as err:  # a failed check is a status, not an error of this call
            return f"unhealthy: {err}"
        return "ready"


class RemoteEngine:
    """An engine hosted by an :class:`~pipelines.deployments.EngineServer` deployment.

    When a call finds the engine's replica dead, in flight or (:func:`assigned`) in Serve's
    router before it, the model is marked recovering: requests get 503 with ``Retry-After`` at
    once rather than waiting in Serve's queue for the replacement, and a probe re-opens the
    model as soon as a replica answers its status call again. :meth:`stop` (the model removed)
    ends the probe: a removed model's engine may never answer again.
    """

    PROBE_TIMEOUT_S = 2.0
    PROBE_PERIOD_S = 0.5

    def __init__(self, handle, model_id: str, scales_to_zero: bool = False) -> None:
        self.handle = handle
        self.model_id = model_id
        self.scales_to_zero = scales_to_zero
        self.down_since: float | None = None
        self.stopped = False
        self._probe: asyncio.Task | None = None
        self._card: dict[str, Any] | None = None

    async def start(self) -> None:
        """Nothing to do: the deployment started the engine."""

    async def stop(self) -> None:
        """Stop probing (the model is removed): its engine's deployment goes with its
        application, and a probe left running would ask it for its status forever."""
        self.stopped = True
        probe, self._probe = self._probe, None
        if probe is not None and not probe.done():
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)

    @property
    def probing(self) -> bool:
        """Whether a probe is waiting for the engine's replica to answer again."""
        return self._probe is not None and not self._probe.done()

    def _check_up(self) -> None:
        if self.down_since is not None:
            raise NotReady(f"model {self.model_id!r} is recovering: its replica died "
                           f"{time.monotonic() - self.down_since:.1f} s ago and is being replaced",
                           model_id=self.model_id, retry="recovering")

    def _failed(self, err: BaseException) -> BaseException:
        mapped = remote_error(err, self.model_id)
        if isinstance(mapped, NotReady) and self.down_since is None and not self.stopped:
            self.down_since = time.monotonic()
            self._probe = asyncio.create_task(self._probe_until_up())
        return mapped

    async def _probe_until_up(self) -> None:
        # Checked each round, beside cancelling the task: Python 3.11's wait_for swallows a
        # cancellation that arrives as the status call fails, and the loop would go on.
        while not self.stopped:
            try:
                if await asyncio.wait_for(self.handle.status.remote(), self.PROBE_TIMEOUT_S) == "ready":
                    self.down_since = None
                    return
            except Exception:  # still down (or the probe itself timed out): probe again
                pass
            await asyncio.sleep(self.PROBE_PERIOD_S)  # the probing period

    def _handle(self, ctx: RequestContext, stream: bool = False):
        """The engine's handle for ``ctx``'s request: an adapter's goes first to a replica that
        holds it (Serve's model multiplexing, ``pipelines.deployments.EngineServer``)."""
        if ctx.adapter is None:
            return self.handle.options(stream=True) if stream else self.handle
        return self.handle.options(stream=stream, multiplexed_model_id=ctx.adapter.name)

    async def generate(self, payload: Any, params: BaseModel, ctx: RequestContext) -> EngineResult:
        self._check_up()
        response = self._handle(ctx).generate.remote(payload, params, ctx)
        try:
            await assigned(response, self.handle, self.model_id, self.scales_to_zero)
            return unwrap(await response)
        except Exception as err:
            raise self._failed(err) from None

    def stream(self, payload: Any, params: BaseModel, ctx: RequestContext) -> AsyncGenerator[EngineResult, None]:
        return self._remote_stream("stream", payload, params, ctx)

    def openai(self, route: str, body: dict, ctx: RequestContext) -> AsyncGenerator[Any, None]:
        return self._remote_stream("openai", route, body, ctx)

    async def model_card(self) -> dict[str, Any]:
        """The engine's facts for /v1/models, asked once it answered them."""
        if self._card is None:
            self._card = await self.handle.model_card.remote()
        return self._card

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats.remote()

    async def _remote_stream(self, method: str, *args) -> AsyncGenerator[Any, None]:
        self._check_up()
        # Closing this generator (client gone) cancels the remote one, and the engine aborts the request.
        chunks = getattr(self._handle(args[-1], stream=True), method).remote(*args)
        try:
            await assigned(chunks, self.handle, self.model_id, self.scales_to_zero)
            async for chunk in chunks:
                yield unwrap(chunk)
        except Exception as err:
            raise self._failed(err) from None
        finally:
            chunks.cancel()

    async def check_local(self) -> None:
        """Nothing here: the engine's own deployment is health-checked by Serve."""

    async def status(self, timeout_s: float) -> str:
        if self.down_since is not None:
            return "recovering"
        try:
            return await asyncio.wait_for(self.handle.status.remote(), timeout_s)
        except asyncio.TimeoutError:
            return "unavailable"
        except Exception as err:
            return f"unhealthy: {remote_error(err, self.model_id)}"
