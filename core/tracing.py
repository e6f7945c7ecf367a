"""OpenTelemetry traces of requests: off unless an OTLP endpoint is given.

On where the process's environment names one, as the OpenTelemetry SDK reads it:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the whole URL), else ``OTEL_EXPORTER_OTLP_ENDPOINT``
(``/v1/traces`` added). The launcher puts ``server.tracing_endpoint`` and its own ``OTEL_*``
variables in the environment of every process of the Ray it starts or joins
(``apps.serving.serve_env``), and each replica calls :func:`setup` as it starts. Spans go out
over OTLP/HTTP (protobuf) in batches; the SDK's other variables (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, headers, compression)
apply as the SDK applies them.

A request's trace: the ingress's span (``api.tracing``), child of the client's ``traceparent``
if it sent one; one span per step (preprocess, engine, postprocess), made by whichever process
runs the step (:func:`step`), its parent carried in :attr:`core.protocol.RequestContext.trace`
(a W3C carrier, a plain dict that crosses Ray calls); and below the engine's, the backend's own
spans where it has them. Each process's spans carry its resource (``mmserve.process``,
``process.pid``).

Off, :func:`step` and :func:`carrier` return at once, and nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, AsyncIterator, Callable, Iterator

#: the standard variables that turn tracing on, in the order the SDK reads them
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_tracer: Any = None  # this process's tracer, once setup() found an endpoint


def endpoint(environ: Any = None) -> str | None:
    """The OTLP/HTTP traces URL the environment names (None: tracing is off)."""
    env = os.environ if environ is None else environ
    if env.get(ENDPOINT_ENVS[0]):
        return env[ENDPOINT_ENVS[0]]
    if env.get(ENDPOINT_ENVS[1]):
        return env[ENDPOINT_ENVS[1]].rstrip("/") + "/v1/traces"
    return None


def enabled() -> bool:
    """Whether this process traces (``setup`` found an endpoint)."""
    return _tracer is not None


def setup(process: str) -> bool:
    """Trace from this process if the environment names an endpoint: a tracer provider with
    an OTLP/HTTP exporter, this process's resource (``mmserve.process``: ``process``, e.g.
    ``ingress`` or ``engine <model id>``; ``process.pid``; ``service.name`` ``mmserve``
    unless the SDK's variables name one), set as the process's global provider, so that a
    backend's own spans in this process go out with it. Once per process. Returns whether on."""
    global _tracer
    if _tracer is not None or endpoint() is None:
        return _tracer is not None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # the protocol of this exporter, for any library in the process that reads the variable
    os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    resource = Resource.create({"mmserve.process": process, "process.pid": os.getpid()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "mmserve"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint())))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("mmserve")
    return True


def flush(timeout_s: float = 2.0) -> None:
    """Send this process's finished spans now (a replica about to stop: its batch would be lost
    with the process); nothing while off."""
    if _tracer is not None:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if hasattr(provider, "force_flush"):
            provider.force_flush(int(timeout_s * 1000))


def tracer() -> Any:
    """This process's tracer (None while off)."""
    return _tracer


def carrier() -> dict[str, str] | None:
    """The current span's context as W3C headers (``traceparent``...), to make what runs next,
    here or in another process, its child; None while off or outside any span."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def note(key: str, value: Any) -> None:
    """Set an attribute on the current span (the ingress's request span, where a route runs);
    nothing while off."""
    if _tracer is not None:
        from opentelemetry import trace

        trace.get_current_span().set_attribute(key, value)


_UNTRACED = nullcontext()  # what step() gives while off: no generator made per step


def step(name: str, ctx: Any, current: bool = True) -> AbstractContextManager[Any]:
    """A span of one step of ``ctx``'s request (a :class:`core.protocol.RequestContext`), child
    of ``ctx.trace``; while the step runs, ``ctx.trace`` is the step's own (unless not
    ``current``: a step that runs beside another), so that what the step calls (a backend,
    another process) is its child. An exception out of the step is recorded on it. Yields the
    span (None while off, or for a request the ingress did not trace)."""
    if _tracer is None or ctx.trace is None:
        return _UNTRACED
    return _step(name, ctx, current)


@contextmanager
def _step(name: str, ctx: Any, current: bool) -> Iterator[Any]:
    from opentelemetry import propagate, trace

    parent = ctx.trace
    span = _tracer.start_span(name, context=propagate.extract(parent), attributes={
        "mmserve.model_id": ctx.model_id, "mmserve.request_id": ctx.request_id, "mmserve.step": name})
    if current:
        headers: dict[str, str] = {}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        ctx.trace = headers
    try:
        yield span
    except (GeneratorExit, asyncio.CancelledError):
        span.set_attribute("mmserve.cancelled", True)  # the client went away, or the deadline passed
        raise
    except BaseException as err:
        failed(span, err)
        raise
    finally:
        ctx.trace = parent
        span.end()


def chunks(name: str, make: Callable[[], AsyncIterator[Any]], ctx: Any) -> AsyncIterator[Any]:
    """The chunks of ``make()`` (a step's stream, made inside its span), in a :func:`step` span
    that times the first chunk (``mmserve.time_to_first_chunk_s``). Off, ``make()`` as it is:
    no generator more on the hot path."""
    if _tracer is None or ctx.trace is None:
        return make()
    return _timed_chunks(name, make, ctx)


async def _timed_chunks(name: str, make: Callable[[], AsyncIterator[Any]], ctx: Any) -> AsyncIterator[Any]:
    with step(name, ctx) as span:
        first = FirstChunk(span)
        async for chunk in make():
            first.chunk()
            yield chunk


def failed(span: Any, err: BaseException) -> None:
    """Record ``err`` on ``span``: its status ERROR, ``error.type`` (the error vocabulary's type
    for mmserve's errors, else the exception's class), and the exception as an event."""
    from opentelemetry.trace import Status, StatusCode

    kind = getattr(err, "type", None) or type(err).__name__
    span.set_attribute("error.type", str(kind))
    span.record_exception(err)
    span.set_status(Status(StatusCode.ERROR, str(err)[:200]))


class FirstChunk:
    """Times a stream's first chunk on a span: ``mmserve.time_to_first_chunk_s`` from when the
    step began (the engine's, or the client's at the ingress)."""

    __slots__ = ("span", "start", "seen")

    def __init__(self, span: Any, start: float | None = None) -> None:
        self.span, self.seen = span, span is None
        self.start = time.perf_counter() if start is None else start

    def chunk(self) -> None:
        if not self.seen:
            self.seen = True
            self.span.set_attribute("mmserve.time_to_first_chunk_s", time.perf_counter() - self.start)
