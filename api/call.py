"""A request's life in a route, in one place: :class:`Call`.

Every route takes one (``call: CallDep``) and reaches the served models, the request's context,
its metrics and its responses only through it, so that a route cannot forget a part:

- ``call.pipeline(model_id)``: the model's pipeline (an adapter's: its base model's; 404
  naming the served ids if none). The
  call holds it (``Pipeline.enter``) until its response has been sent, a stream to its last
  event or to the client going away, so that an update removing the model waits for it; the
  request's metrics count it for that model from then on.
- ``call.context(...)``, ``call.infer_context(body)``: the :class:`~core.protocol.RequestContext`
  (request id, deadline) that travels with the request to every step.
- ``call.json``, ``call.sse``, ``call.error``: the response. A stream tells the request's
  metrics of its end and of an error event.
- A ``core.errors`` exception the route raises is rendered by ``api.errors`` (the app's
  handler), its type counted; any other exception becomes one logged 500 naming the request id.

FastAPI runs :func:`_held` (scope ``request``) around the whole exchange, the response's last
byte included, and :func:`_guarded` (scope ``function``) around the route alone: what fails
while a response is being sent (a client gone) is no route's error to render.

What the ASGI middleware keeps is what every HTTP request needs, routed or not (an unknown path,
a 401 or 413 refused before any route): the request id (``api.middleware``) and the request's
metrics record (``api.metrics``), which the call reads once.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, AsyncGenerator, AsyncIterator

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from api.context import check_infer_shape, json_response, sse_events, timeout_of
from api.errors import error_response, internal_error
from api.metrics import record_of
from core import tracing
from core.config import ServerConfig
from core.errors import MMServeError
from core.protocol import InferRequest, RequestContext
from pipelines.router import ModelRouter
from pipelines.runner import Pipeline

#: what the app's exception handlers render themselves (``api.app``)
RENDERED = (MMServeError, HTTPException, RequestValidationError)


class Call:
    """One HTTP request as a route answers it (see the module's docstring).

    ``router`` and ``server``: the app's model router and server config; ``app``: the rest of
    what ``create_app`` keeps (``started``, ``scrape``); ``request``: the request itself, for
    its body and headers."""

    __slots__ = ("request", "app", "router", "server", "request_id", "record", "model_id", "_held")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.app = request.app.state
        self.router: ModelRouter = self.app.router
        self.server: ServerConfig = self.app.server
        self.request_id: str = request.state.request_id  # api.middleware.RequestEnvelope's
        self.record = record_of(request.scope)
        self.model_id: str | None = None
        self._held: Pipeline | None = None

    def pipeline(self, model_id: str, serving: bool = True) -> Pipeline:
        """The pipeline of ``model_id`` (an adapter's: its base model's; ModelNotFound, 404,
        naming the served ids, if none), held until the response is sent; the first model
        named is the request's. ``serving``: the model must be ready to serve (NotReady, 503,
        naming what it waits for or why it failed, if not); a route that only describes it
        passes False."""
        pipeline = self.router.get(model_id)
        if serving:
            pipeline.check_serving()
        if self._held is None:
            pipeline.enter()
            self._held = pipeline
            self.model_id = model_id  # an adapter's own id: its metrics are its own
            self.record.for_model(self.model_id)
            tracing.note("mmserve.model_id", model_id)
        return pipeline

    def _release(self) -> None:
        if self._held is not None:
            self._held.leave()
            self._held = None

    def context(self, model_id: str, timeout: Any = None, field: str = "params.timeout_s") -> RequestContext:
        """The request's context: its id, and its deadline from ``timeout`` (a body field named
        ``field``) or the ``x-request-timeout`` header (seconds), else
        ``server.request_timeout_s``, capped by ``server.max_request_timeout_s``. An adapter's
        id carries the adapter (``RequestContext.adapter``) to its base model's engine."""
        if timeout is None and "x-request-timeout" in self.request.headers:
            timeout, field = self.request.headers["x-request-timeout"], "x-request-timeout"
        seconds = timeout_of(timeout, field, self.server, model_id)
        return RequestContext(request_id=self.request_id, model_id=model_id,
                              deadline=time.time() + seconds, timeout_s=seconds,
                              adapter=self.router.adapters.get(model_id), trace=tracing.carrier())

    def infer_context(self, body: InferRequest) -> RequestContext:
        """The context of a ``/v1/infer`` request (see :meth:`context`): the body's shape is
        checked against the server's limits first, and ``params.timeout_s`` is taken out of
        the params the engine sees."""
        check_infer_shape(body, self.server)
        return self.context(body.model_id, body.params.pop("timeout_s", None))

    def json(self, body: Any) -> JSONResponse:
        """A JSON answer; bytes inside become base64."""
        return json_response(body)

    def sse(self, chunks: AsyncGenerator[Any, None], ctx: RequestContext) -> StreamingResponse:
        """A streamed answer (``api.context.sse_events``)."""
        return StreamingResponse(sse_events(chunks, ctx, self.record), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    def error(self, err: MMServeError) -> JSONResponse:
        """An error answered rather than raised (e.g. ``/ready``'s 503), rendered as any other."""
        return error_response(err, self.server, self.record)


async def _held(request: Request) -> AsyncIterator[Call]:
    call = Call(request)
    try:
        yield call
    finally:  # after the response's last byte, a stream's too, or the client going away
        call._release()


async def _guarded(call: Annotated[Call, Depends(_held, scope="request")]) -> AsyncIterator[Call]:
    try:
        yield call
    except RENDERED:
        raise
    except Exception:
        raise internal_error(call.request_id, call.model_id) from None


#: a route's one parameter for its request's life: ``async def route(call: CallDep)``
CallDep = Annotated[Call, Depends(_guarded, scope="function")]
