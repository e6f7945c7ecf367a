"""One model's pipeline: preprocess → engine → postprocess, wherever each step runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncGenerator, Callable

from pydantic import ValidationError

from core import metrics, tracing
from core.config import ModelConfig
from core.errors import InvalidField, NotReady, Unsupported
from core.protocol import InferRequest, OpenAIBody, RequestContext
from core.registry import engine_of, node_class, off_loop_importing
from pipelines.stages import EngineStep, NodeStep

logger = logging.getLogger("mmserve.pipeline")

#: what each modality's pipelines take, as ``GET /v1/models`` lists it (``inputs``)
INPUTS = {"text": ["text"], "audio": ["audio"], "vision": ["image"], "video": ["video"]}


class Pipeline:
    """Runs a request through one model's steps (see :mod:`pipelines.stages`).

    Request params are checked here, in the ingress, against the engine's ``Params`` schema
    merged over the model's default ``params``, so bad input is refused before any hop. The time
    each step takes, as seen from here, is ``mmserve_node_duration_seconds``.
    """

    def __init__(self, model: ModelConfig, preprocess: NodeStep, engine: EngineStep, postprocess: NodeStep,
                 spec: Any = None, check: Callable[[], None] | None = None) -> None:
        self.model = model
        self.spec = spec  # the RouteSpec it was built from (the ingress compares them on updates)
        self._check = check  # raises if this process cannot run the local steps (run at start)
        self.preprocess = preprocess
        self.engine = engine
        self.postprocess = postprocess
        self.in_flight = 0  # HTTP requests holding this pipeline (api.call.Call.pipeline)
        self._idle = asyncio.Event()
        self._idle.set()
        cls = engine_of(model)
        self.params_schema = cls.Params
        hosting = cls.hosting(model)
        #: the OpenAI-compatible routes the engine answers for the model (its hosting's)
        self.openai_routes = hosting.routes
        #: the adapters of the model's config, each served under its own id, and whether the
        #: engine takes more at run time
        self.adapters = hosting.adapters
        self.takes_adapters = hosting.takes_adapters
        #: its engine starts slowly: it may wait its turn to start (ModelRouter.begin)
        self.slow_start = hosting.slow_start
        node = getattr(preprocess, "node", None)  # a local node; a remote one by its config's name
        pre = type(node) if node is not None else (node_class(spec.preprocess.name) if spec is not None else None)
        #: the preprocess node checks OpenAI-compatible bodies too (e.g. a chat's images)
        self.checks_openai = bool(getattr(pre, "checks_openai", False))
        inputs_of = getattr(pre, "inputs_of", None)  # a node that knows, from the model's config
        self.inputs = inputs_of(model) if inputs_of else INPUTS.get(model.modality, [])
        # start-up: the steps this process starts, and what it still waits for elsewhere (the
        # model's own deployments, part -> what Serve says of them; see ModelRouter.begin)
        self.created = time.monotonic()
        self.started = False
        self.waiting_for: dict[str, str] = {}
        self.failure: str | None = None
        self.ready_after_s: float | None = None
        self.turn: str | None = None  # while it waits its turn to start: for what
        self.settled = asyncio.Event()  # set once it is ready or has failed

    def timer(self, node: str):
        """The node's latency histogram (a no-op while metrics are off)."""
        if not metrics.ENABLED:
            return _NO_TIMER
        return metrics.series(metrics.NODE_DURATION, self.model.model_id, node)

    async def start(self) -> None:
        """Check that this process can run the local steps (``check``), start them; a failure
        is the model's (:meth:`fail`) and is raised."""
        try:
            if self._check is not None:
                await off_loop_importing(self._check)
            for step in (self.preprocess, self.engine, self.postprocess):
                await step.start()
        except Exception as err:
            self.fail(f"{type(err).__name__}: {err}")
            raise
        self.started = True
        self._settle()

    # --- start-up state ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``starting`` (a step still starting, here or in its deployment), ``ready`` (every
        step up: requests go through) or ``failed`` (a step could not start: :attr:`failure`)."""
        if self.failure is not None:
            return "failed"
        return "ready" if self.started and not self.waiting_for else "starting"

    @property
    def state_detail(self) -> str:
        """What a starting model waits for, or why it failed ('' once ready)."""
        if self.failure is not None:
            return self.failure
        if self.turn is not None:
            return f"waiting to start, {self.turn}"
        parts = [f"{part}: {what}" for part, what in self.waiting_for.items()]
        if not self.started:
            parts.append("starting in the ingress")
        return "; ".join(parts)

    def waiting(self, part: str, what: str | None) -> None:
        """Record what ``part`` (a step with a deployment of its own) is doing (None: it is up)."""
        if what is None:
            self.waiting_for.pop(part, None)
            self._settle()
        else:
            self.waiting_for[part] = what

    def fail(self, why: str) -> None:
        """The model cannot start: it answers 503 naming ``why`` until it is replaced."""
        if self.failure is None:
            self.failure = why
        self.settled.set()

    def _settle(self) -> None:
        if self.state == "ready" and self.ready_after_s is None:
            self.ready_after_s = round(time.monotonic() - self.created, 1)
            logger.info("model %r ready after %.1f s", self.model.model_id, self.ready_after_s)
            self.settled.set()

    def check_serving(self) -> None:
        """Raise NotReady (503) unless the model is ready: naming what it waits for, with
        Retry-After while it starts; naming why, without one, if it failed."""
        state = self.state
        if state == "ready":
            return
        model_id = self.model.model_id
        if state == "failed":
            raise NotReady(f"model {model_id!r} failed to start: {self.failure}", model_id=model_id)
        elapsed = time.monotonic() - self.created
        raise NotReady(f"model {model_id!r} is starting ({self.state_detail}; {elapsed:.0f} s so far)",
                       model_id=model_id, retry="starting")

    async def stop(self) -> None:
        """Stop every step (:meth:`pipelines.stages.Step.stop`): a removed model's inline engine
        is shut down, a remote engine's probe of a dead replica ends."""
        for step in (self.preprocess, self.engine, self.postprocess):
            await step.stop()

    def enter(self) -> None:
        """An HTTP request holds this pipeline until :meth:`leave` (its response is sent)."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request holds this pipeline (at most ``timeout_s``); whether none does."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def check_params(self, params: dict[str, Any]):
        """Validate request params over the model's defaults; raises InvalidField naming the key."""
        try:
            return self.params_schema.model_validate({**self.model.params, **params})
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(["params", *map(str, e["loc"])])
            msg = "unknown parameter" if e["type"] == "extra_forbidden" else e["msg"]
            raise InvalidField(f"{field}: {msg}", model_id=self.model.model_id, field=field) from None

    async def prepare(self, request: InferRequest, ctx: RequestContext) -> tuple[Any, Any]:
        """Check params and preprocess: everything a client can get wrong fails here, before
        any response (streamed or not) has started. Returns ``(payload, params)``."""
        params = self.check_params(request.params)
        ctx.params = params  # preprocess may need them (e.g. a video's frame rate)
        ctx.stage = "preprocess"
        with metrics.timed(self.timer("preprocess")):
            payload = await self.preprocess(request.model_input(), ctx)
        return payload, params

    async def complete(self, payload: Any, params, ctx: RequestContext) -> dict[str, Any]:
        """The whole answer to a prepared request."""
        ctx.stage = "engine"
        with metrics.timed(self.timer("engine")):
            result = await self.engine.generate(payload, params, ctx)
        ctx.stage = "postprocess"
        with metrics.timed(self.timer("postprocess")):
            return await self.postprocess(result, ctx)

    async def stream(self, payload: Any, params, ctx: RequestContext) -> AsyncGenerator[dict[str, Any], None]:
        """The answer to a prepared request, one postprocessed chunk at a time."""
        ctx.stage = "engine"
        # each chunk's postprocess, untraced: the stream's postprocess is one span, from its
        # first chunk to its end, with the chunks and the time they took
        post_ctx = dataclasses.replace(ctx, stage="postprocess", trace=None)
        post, chunks = 0.0, 0  # the stream's engine time is its whole time less its postprocessing
        start = time.perf_counter()
        with tracing.step("postprocess", ctx, current=False) as span:
            try:
                async for chunk in self.engine.stream(payload, params, ctx):
                    t = time.perf_counter()
                    out = await self.postprocess(chunk, post_ctx)
                    post += time.perf_counter() - t
                    chunks += 1
                    yield out
            finally:
                self.timer("engine").observe(time.perf_counter() - start - post)
                self.timer("postprocess").observe(post)
                if span is not None:
                    span.set_attributes({"mmserve.chunks": chunks, "mmserve.busy_s": post})

    def openai(self, route: str, body: dict[str, Any], ctx: RequestContext) -> AsyncGenerator[Any, None]:
        """An OpenAI-compatible request (``route``: ``chat``, ``completion``, ``embedding``...),
        answered by the engine in its own protocol: one dict, or SSE events as strings.
        Raises Unsupported, naming the routes the model serves, for another route."""
        if route not in self.openai_routes:
            served = ", ".join(sorted(self.openai_routes)) or "none (use POST /v1/infer)"
            raise Unsupported(f"model {self.model.model_id!r} ({self.model.pipeline} pipeline) does not "
                              f"serve {route} requests; its OpenAI-compatible routes: {served}",
                              model_id=self.model.model_id, field="model")
        if self.checks_openai:
            return self._timed(self._checked_openai(route, body, ctx), self.timer("engine"))
        ctx.stage = "engine"  # no extra generator on the text path: the engine's chunks as they come
        return self._timed(self.engine.openai(route, body, ctx), self.timer("engine"))

    async def _checked_openai(self, route: str, body: dict[str, Any], ctx: RequestContext) -> AsyncGenerator[Any, None]:
        """The preprocess node's check of ``body`` (e.g. a chat's images), then the engine's answer."""
        ctx.stage = "preprocess"
        body = (await self.preprocess(OpenAIBody(route, body), ctx)).body
        ctx.stage = "engine"
        chunks = self.engine.openai(route, body, ctx)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    @staticmethod
    async def _timed(chunks: AsyncGenerator[Any, None], hist) -> AsyncGenerator[Any, None]:
        start = time.perf_counter()
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
            hist.observe(time.perf_counter() - start)

    async def model_card(self) -> dict[str, Any]:
        """What the running engine tells about the model (e.g. max_model_len, root, permission)."""
        return await self.engine.model_card()

    async def stats(self) -> dict[str, Any]:
        """The engine's counters of its backend (``Engine.stats``), wherever it runs."""
        return await self.engine.stats()

    async def status(self, timeout_s: float) -> str:
        """``ready``, ``starting: <what it waits for>``, ``failed: <why>``, ``recovering``,
        ``unavailable`` or ``unhealthy: <why>``."""
        if (state := self.state) != "ready":
            return f"{state}: {self.state_detail}"
        return await self.engine.status(timeout_s)

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {"model_id": m.model_id, "modality": m.modality, "pipeline": m.pipeline,
                "engine": m.engine, "source": m.source, "engine_kwargs": m.engine_kwargs,
                "inputs": self.inputs, "params": m.params,
                "deployment": m.deployment.model_dump(exclude_none=True),
                "openai_routes": sorted(self.openai_routes)}


class _NoTimer:
    def observe(self, seconds: float) -> None:
        pass


_NO_TIMER = _NoTimer()
