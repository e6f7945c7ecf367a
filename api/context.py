"""The pieces of a request's answer that need no request: shape limits, the deadline a client
asks for, running a pipeline within the deadline, and streaming its answer as SSE.
:class:`api.call.Call` puts them together for each request; routes reach them through it."""

from __future__ import annotations

import base64
import json
from typing import Any, AsyncGenerator, AsyncIterator

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.errors import error_event, internal_error
from api.metrics import UNRECORDED, RequestRecord
from core.config import ServerConfig
from core.deadline import iterate_within_deadline, within_deadline
from core.errors import InvalidField, MMServeError
from core.protocol import InferRequest, RequestContext
from pipelines.runner import Pipeline


DONE = "data: [DONE]"


async def sse_events(chunks: AsyncGenerator[Any, None], ctx: RequestContext,
                     record: RequestRecord = UNRECORDED) -> AsyncIterator[bytes]:
    """Server-Sent Events. A dict chunk (a pipeline's) is sent as one ``data:`` event and the
    stream ends with ``data: [DONE]``; string chunks are events the engine framed itself in its
    own protocol (OpenAI or Anthropic events, their ``[DONE]`` included) and pass as they
    are. If the stream fails after it started (the deadline included), an error event ends it.
    Closing it (client gone) closes ``chunks``, which cancels the work behind them.
    ``record`` (the request's metrics) hears of such an error, and of the stream's end."""
    framed = False
    try:
        async for chunk in iterate_within_deadline(chunks, ctx):
            if isinstance(chunk, str):
                framed = True
                if chunk.startswith(DONE):
                    record.ended()
                yield chunk.encode()
            else:
                try:
                    data = json.dumps(chunk)
                except TypeError:
                    data = json.dumps(jsonable(chunk))
                yield b"data: " + data.encode() + b"\n\n"
    except MMServeError as err:
        yield error_event(err, record)
    except Exception:
        yield error_event(internal_error(ctx.request_id, ctx.model_id), record)
    finally:
        await chunks.aclose()  # closes the pipeline's stream now, not at garbage collection
    if not framed:
        record.ended()
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


def timeout_of(raw: Any, field: str, server: ServerConfig, model_id: str) -> float:
    """The seconds a request may take: ``raw`` (what the client sent in ``field``, a body field
    or the ``x-request-timeout`` header; None: it sent none) or ``server.request_timeout_s``,
    capped by ``server.max_request_timeout_s``. InvalidField (422) if ``raw`` is not a positive
    number."""
    seconds = server.request_timeout_s
    if raw is not None:
        try:
            seconds = float(raw)
        except (TypeError, ValueError):
            seconds = -1.0
        if not seconds > 0 or isinstance(raw, bool):
            raise InvalidField(f"{field}: must be a positive number of seconds (got {raw!r})",
                               model_id=model_id, field=field)
    return min(seconds, server.max_request_timeout_s)


def check_infer_shape(body: InferRequest, server: ServerConfig) -> None:
    """:func:`check_shape` of a ``/v1/infer`` body's fields (media data aside: its size is
    bounded by the model's ``max_bytes``)."""
    for name in ("input", "prompt", "messages", "params"):
        value = getattr(body, name)
        if name == "input" and isinstance(value, dict) and "data" in value:
            value = {k: v for k, v in value.items() if k != "data"}
        check_shape(value, server, name, body.model_id)


async def run_pipeline(pipeline: Pipeline, body: InferRequest, ctx: RequestContext):
    """Prepare (all client errors surface here), then the whole result, or for ``stream`` the
    chunk iterator, all within the request's deadline."""
    payload, params = await within_deadline(pipeline.prepare(body, ctx), ctx)
    if body.stream:
        return pipeline.stream(payload, params, ctx)
    return await within_deadline(pipeline.complete(payload, params, ctx), ctx)
