"""Every error a client sees leaves through here: as a JSON response, as the last event of a
stream, or from the ASGI middleware before a route runs. The body is always
:meth:`core.errors.MMServeError.to_dict`."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.responses import JSONResponse

from api.metrics import UNRECORDED, RequestRecord
from core import tracing
from core.config import RetryAfter, ServerConfig
from core.errors import MMServeError

logger = logging.getLogger("mmserve.api")

ERROR_SCHEMA: dict[str, Any] = {"description": "Error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                       "model_id": {"type": ["string", "null"]}, "field": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}}}}}

#: one Server-Sent Event (a ``data:`` line, and the ``event:`` name some protocols give it)
SSE_EVENT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}

#: the statuses every route may answer with an error body
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {status: ERROR_SCHEMA for status in (400, 401, 403, 404, 413, 415, 422, 503, 504)}


def error_response(err: MMServeError, server: ServerConfig | None = None,
                   record: RequestRecord = UNRECORDED) -> JSONResponse:
    """The JSON response of an error, with its headers; ``Retry-After`` from the server's
    policy (``server.retry_after_s``) for the error's cause. ``record`` (the request's metrics,
    ``api.metrics.record_of``) is told the error's type."""
    record.failed(err.type)
    tracing.note("error.type", err.type)
    headers = dict(err.headers)
    if err.retry is not None and "Retry-After" not in headers:
        policy = server.retry_after_s if server is not None else RetryAfter()
        headers["Retry-After"] = str(getattr(policy, err.retry))
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers or None)


def error_event(err: MMServeError, record: RequestRecord = UNRECORDED) -> bytes:
    """An error as the Server-Sent Event that ends a stream which had already started."""
    record.failed(err.type)
    tracing.note("error.type", err.type)
    return b"data: " + json.dumps(err.to_dict()).encode() + b"\n\n"


def asgi_error(err: MMServeError, request_id: str | None, extra: list | None = None,
               record: RequestRecord = UNRECORDED) -> tuple[dict, dict]:
    """An error as the two ASGI messages (start, body) that the middleware sends itself."""
    record.failed(err.type)
    tracing.note("error.type", err.type)
    raw = json.dumps(err.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    headers += extra or []
    return ({"type": "http.response.start", "status": err.status, "headers": headers},
            {"type": "http.response.body", "body": raw})


def internal_error(request_id: str, model_id: str | None) -> MMServeError:
    """Log the exception being handled, once, and the 500 that answers it."""
    logger.exception("request %s to %s failed", request_id, model_id)
    return MMServeError(f"internal error (request id {request_id})", model_id=model_id)
