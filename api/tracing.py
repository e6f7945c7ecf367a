"""The ingress's span of each HTTP request (``core.tracing`` says when tracing is on).

A SERVER span named ``<method> <route template>``, child of the client's W3C ``traceparent``
if it sent one, current while the route runs, so that the request's context
(``api.call.Call.context``) carries it to every step; the response carries its trace id in
``x-trace-id``. It records the HTTP status, the model (``api.call.Call.pipeline``), the error
vocabulary's type of an error answer (``api.errors``), and for a stream the time to its first
chunk as the client sees it (``mmserve.time_to_first_chunk_s``), beside the engine's own.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from api.metrics import is_event_stream
from core import tracing

TRACE_ID_HEADER = b"x-trace-id"


class RequestTracing:
    """ASGI middleware: the span above, for every HTTP request (those refused before any route,
    a 401 or 413, included)."""

    def __init__(self, app, route_of: Callable[[Any], str]) -> None:
        self.app = app
        self.route_of = route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not tracing.enabled():
            return await self.app(scope, receive, send)
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate")}
        route = self.route_of(scope)
        start = time.perf_counter()
        with tracing.tracer().start_as_current_span(
                f"{scope['method']} {route}", context=propagate.extract(headers) if headers else None,
                kind=SpanKind.SERVER, record_exception=True, set_status_on_exception=True,
                attributes={"http.request.method": scope["method"], "http.route": route,
                            "url.path": scope["path"]}) as span:
            trace_id = trace.format_trace_id(span.get_span_context().trace_id).encode()
            first = tracing.FirstChunk(None)

            async def send_traced(message):
                nonlocal first
                if message["type"] == "http.response.start":
                    code = message["status"]
                    span.set_attribute("http.response.status_code", code)
                    if code >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                    first = tracing.FirstChunk(span if is_event_stream(message) else None, start)
                    message = {**message, "headers": [*message.get("headers", ()), (TRACE_ID_HEADER, trace_id)]}
                elif message["type"] == "http.response.body" and message.get("body"):
                    first.chunk()
                await send(message)

            await self.app(scope, receive, send_traced)
