"""The ingress's request metrics (``core.metrics``): an ASGI middleware that counts every
response by model, route, status and error type, and times it.

Outermost of the app's middleware, so that every response is counted, those that no route
answers too (what :class:`~api.middleware.RequestEnvelope` refuses, 401 and 413; an unknown
path). It sees the status, the first event of a stream (time to first token) and a client that
goes away; the rest it learns through the request's :class:`RequestRecord`, which a route
reaches only through its :class:`api.call.Call` (the model, a stream's end) and the error
renderer (``api.errors``: the error's type).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from core import metrics as m

if TYPE_CHECKING:
    from prometheus_client import Gauge

_KEY = "metrics"  # where the record travels in the ASGI scope's ``state``


class RequestRecord:
    """What the middleware learns of one request while it is answered. The route's part (its
    model, the type of its error, the end of its stream) is told by :class:`api.call.Call` and
    by the error renderer (``api.errors``), through the methods below."""

    __slots__ = ("route", "model_id", "error", "code", "first", "sse", "done", "gone", "in_flight")

    def __init__(self, route: str) -> None:
        self.route = route
        self.model_id = ""
        self.error = ""
        self.code = 0
        self.first = 0.0
        self.sse = False
        self.done = False
        self.gone = False
        self.in_flight: Gauge | None = None  # the model's series of IN_FLIGHT, once it is named

    def for_model(self, model_id: str) -> None:
        """The request is for this served model (the first one named counts)."""
        if self.in_flight is None:
            self.model_id = model_id
            self.in_flight = m.series(m.IN_FLIGHT, model_id, self.route)
            self.in_flight.inc()

    def failed(self, error_type: str) -> None:
        """The request ends with an error of this type (a JSON error, or a stream's last event)."""
        self.error = error_type

    def ended(self) -> None:
        """The stream has sent its last event (``data: [DONE]``): a client that closes the
        connection now (as OpenAI's client does) did not go away early."""
        self.done = True


class _Unrecorded(RequestRecord):
    """The record of a request while metrics are off: it keeps nothing."""

    __slots__ = ()

    def for_model(self, model_id: str) -> None:
        pass

    def failed(self, error_type: str) -> None:
        pass

    def ended(self) -> None:
        pass


UNRECORDED = _Unrecorded("")


def record_of(scope) -> RequestRecord:
    """The record :class:`RequestMetrics` keeps of this request (``scope``: its ASGI scope), or
    one that keeps nothing while metrics are off."""
    return scope.get("state", {}).get(_KEY, UNRECORDED)


class RouteTemplates:
    """The path template of the route a request is for (``other`` for none): the ``route``
    label of the metrics, and a span's ``http.route``."""

    def __init__(self, routes) -> None:
        self.static: dict[str, str] = {}
        self.templated: list = []
        for route in routes:
            path = getattr(route, "path", None)
            if path is None:
                continue
            if "{" in path:
                self.templated.append(route)
            else:
                self.static[path] = path

    def __call__(self, scope) -> str:
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        found = self.static.get(path)
        if found is not None:
            return found
        for route in self.templated:
            if route.path_regex.match(path):
                return route.path
        return "other"


def is_event_stream(start: dict) -> bool:
    """Whether a response (its ``http.response.start`` message) is a Server-Sent Events stream."""
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.get("headers", ()))


class RequestMetrics:
    """Counts and times every HTTP request (``mmserve_requests_total`` and the rest)."""

    def __init__(self, app, routes) -> None:
        self.app = app
        self.route_of = RouteTemplates(routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        rec = RequestRecord(self.route_of(scope))
        scope.setdefault("state", {})[_KEY] = rec

        async def receive_watched():
            message = await receive()
            if message["type"] == "http.disconnect" and not rec.done:
                rec.gone = True
            return message

        async def send_watched(message):
            kind = message["type"]
            if kind == "http.response.start":
                rec.code = message["status"]
                rec.sse = is_event_stream(message)
            elif kind == "http.response.body":
                if rec.sse and not rec.first and message.get("body"):
                    rec.first = time.perf_counter()
                if not message.get("more_body", False):
                    rec.done = True
            try:
                await send(message)
            except OSError:
                rec.gone = True
                raise

        try:
            await self.app(scope, receive_watched, send_watched)
        except BaseException:
            if not rec.code:
                rec.code = 500
            raise
        finally:
            self._record(rec, start)

    @staticmethod
    def _record(rec: RequestRecord, start: float) -> None:
        end = time.perf_counter()
        model_id, route = rec.model_id, rec.route
        error = rec.error
        if rec.gone and not rec.done:
            error = error or "client_disconnected"
            m.series(m.DISCONNECTS, model_id, route).inc()
        m.series(m.REQUESTS, model_id, route, str(rec.code or 500), error).inc()
        m.series(m.DURATION, model_id, route).observe(end - start)
        if rec.first:
            m.series(m.TTFT, model_id, route).observe(rec.first - start)
        if rec.in_flight is not None:
            rec.in_flight.dec()
