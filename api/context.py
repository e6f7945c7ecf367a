"""What every route does around a model's pipeline: the request's context (id, deadline,
shape limits), running it within that deadline, and streaming its answer as SSE."""

from __future__ import annotations

import base64
import json
import time
from contextlib import contextmanager
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from api.errors import error_event, internal_error
from api.metrics import model_found, stream_ended
from core.config import ServerConfig
from core.deadline import iterate_within_deadline, within_deadline
from core.errors import InvalidField, MMServeError
from core.protocol import InferRequest, RequestContext
from pipelines.runner import Pipeline


def pipeline_of(request: Request, model_id: str) -> Pipeline:
    """The pipeline of ``model_id`` (ModelNotFound, 404, naming the served ids, if none);
    the request metrics count the request for that model from here on, and the request holds
    the pipeline until its response is sent (``api.middleware.RequestEnvelope`` lets go), so
    that an update removing the model waits for it."""
    pipeline = request.app.state.router.get(model_id)
    model_found(request.state, pipeline.model.model_id)
    if getattr(request.state, "pipeline", None) is None:
        pipeline.enter()
        request.state.pipeline = pipeline
    return pipeline


@contextmanager
def internal_errors(ctx: RequestContext):
    """Let MMServeErrors through; anything else becomes one logged 500 naming the request id."""
    try:
        yield
    except MMServeError:
        raise
    except Exception:
        raise internal_error(ctx) from None


DONE = "data: [DONE]"


async def sse_events(chunks: AsyncIterator[Any], ctx: RequestContext, state: Any = None) -> AsyncIterator[bytes]:
    """Server-Sent Events. A dict chunk (a pipeline's) is sent as one ``data:`` event and the
    stream ends with ``data: [DONE]``; string chunks are events the engine framed itself in its
    own protocol (OpenAI or Anthropic events, their ``[DONE]`` included) and pass as they
    are. If the stream fails after it started (the deadline included), an error event ends it.
    Closing it (client gone) closes ``chunks``, which cancels the work behind them.
    ``state`` (the request's) hears of such an error for the request metrics."""
    framed = False
    try:
        async for chunk in iterate_within_deadline(chunks, ctx):
            if isinstance(chunk, str):
                framed = True
                if state is not None and chunk.startswith(DONE):
                    stream_ended(state)
                yield chunk.encode()
            else:
                try:
                    data = json.dumps(chunk)
                except TypeError:
                    data = json.dumps(jsonable(chunk))
                yield b"data: " + data.encode() + b"\n\n"
    except MMServeError as err:
        yield error_event(err, state)
    except Exception:
        yield error_event(internal_error(ctx), state)
    finally:
        await chunks.aclose()  # closes the pipeline's stream now, not at garbage collection
    if not framed:
        if state is not None:
            stream_ended(state)
        yield b"data: [DONE]\n\n"


def jsonable(value: Any) -> Any:
    """``value`` with any bytes in it as base64 strings (the form media takes in a JSON body),
    e.g. an uploaded file that an echo model hands back."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def json_response(body: Any) -> JSONResponse:
    """A JSON response; bytes inside become base64 (tried only when plain JSON fails)."""
    try:
        return JSONResponse(body)
    except TypeError:
        return JSONResponse(jsonable(body))


def sse_response(chunks: AsyncIterator[Any], ctx: RequestContext, state: Any = None) -> StreamingResponse:
    return StreamingResponse(sse_events(chunks, ctx, state), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def check_shape(value: Any, server: ServerConfig, path: str, model_id: str, depth: int = 2) -> None:
    """Refuse (422, naming the place) nesting deeper than ``server.max_json_depth`` (the body
    itself is level 1, so a field's value is level 2) and strings longer than
    ``server.max_string_chars``, before any node sees them."""
    if isinstance(value, str):
        if len(value) > server.max_string_chars:
            raise InvalidField(f"{path}: a string of {len(value)} characters; the limit is "
                               f"{server.max_string_chars} (server.max_string_chars)", model_id=model_id, field=path)
    elif isinstance(value, BaseModel):
        check_shape(value.model_dump(exclude_none=True), server, path, model_id, depth)
    elif isinstance(value, (dict, list)):
        if depth > server.max_json_depth:
            raise InvalidField(f"{path}: nested deeper than {server.max_json_depth} levels "
                               f"(server.max_json_depth)", model_id=model_id, field=path)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            check_shape(v, server, f"{path}.{k}", model_id, depth + 1)


def deadline_context(request: Request, server: ServerConfig, model_id: str,
                     timeout: Any = None, field: str = "params.timeout_s") -> RequestContext:
    """The request's context: its id, and its deadline from ``timeout`` (a body field named
    ``field``) or the ``x-request-timeout`` header (seconds), else ``server.request_timeout_s``,
    capped by ``server.max_request_timeout_s``."""
    raw = timeout
    if raw is None and "x-request-timeout" in request.headers:
        raw, field = request.headers["x-request-timeout"], "x-request-timeout"
    seconds = server.request_timeout_s
    if raw is not None:
        try:
            seconds = float(raw)
        except (TypeError, ValueError):
            seconds = -1.0
        if not seconds > 0 or isinstance(raw, bool):
            raise InvalidField(f"{field}: must be a positive number of seconds (got {raw!r})",
                               model_id=model_id, field=field)
    seconds = min(seconds, server.max_request_timeout_s)
    return RequestContext(request_id=request.state.request_id, model_id=model_id,
                          deadline=time.time() + seconds, timeout_s=seconds)


def request_context(body: InferRequest, request: Request, server: ServerConfig) -> RequestContext:
    """The context of a ``/v1/infer`` request (see :func:`deadline_context`): the body's shape
    is checked against the server's limits first, and ``params.timeout_s`` is taken out of the
    params the engine sees."""
    for name in ("input", "prompt", "messages", "params"):
        value = getattr(body, name)
        if name == "input" and isinstance(value, dict) and "data" in value:
            value = {k: v for k, v in value.items() if k != "data"}  # media: bounded by max_bytes
        check_shape(value, server, name, body.model_id)
    return deadline_context(request, server, body.model_id, body.params.pop("timeout_s", None))


async def run_guarded(pipeline: Pipeline, body: InferRequest, ctx: RequestContext):
    """Prepare (all client errors surface here), then the whole result, or for ``stream`` the
    chunk iterator, all within the request's deadline. Unexpected failures become one logged 500."""
    with internal_errors(ctx):
        payload, params = await within_deadline(pipeline.prepare(body, ctx), ctx)
        if body.stream:
            return pipeline.stream(payload, params, ctx)
        return await within_deadline(pipeline.complete(payload, params, ctx), ctx)
