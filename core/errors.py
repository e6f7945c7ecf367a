"""The one error vocabulary of mmserve.

Every failure a client can cause or observe is one of these exceptions. Each carries the HTTP
status it maps to, a stable ``type`` string, a message a user can act on, and optionally the
``model_id`` and the ``field`` involved. :meth:`MMServeError.to_dict` is the one rendering of
an error body (``api.errors`` sends it as JSON, as an SSE event or from the ASGI middleware);
nodes and engines only raise them. The body carries OpenAI's ``param`` and ``code`` beside
mmserve's ``field`` and ``model_id``, so OpenAI clients read it as they read an OpenAI-compatible
server's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class MMServeError(Exception):
    """Base of all errors a client can see. Subclasses fix ``status`` and ``type``."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, model_id: str | None = None, field: str | None = None,
                 headers: dict[str, str] | None = None, details: dict[str, Any] | None = None,
                 retry: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.model_id = model_id
        self.field = field
        self.headers = headers or {}
        self.details = details or {}  # more keys of the error body (e.g. each model's status)
        # why a retry may succeed: a key of server.retry_after_s, which gives Retry-After
        self.retry = retry

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the error response: ``{"error": {...}}``."""
        err: dict[str, Any] = {"type": self.type, "message": self.message, "model_id": self.model_id}
        if self.field is not None:
            err["field"] = self.field
        err["param"] = self.field
        err["code"] = self.status
        return {"error": {**err, **self.details}}

    def __reduce__(self):
        # Errors cross Ray process boundaries; keep keyword-only state through pickling.
        return (_rebuild, (type(self), self.message, self.model_id, self.field, self.headers,
                           self.details, self.retry))


def _rebuild(cls, message, model_id, field, headers, details=None, retry=None):
    return cls(message, model_id=model_id, field=field, headers=headers, details=details, retry=retry)


class BadRequest(MMServeError):
    """The request body could not be read at all (malformed JSON, wrong content type)."""

    status = 400
    type = "bad_request"


class Unauthorized(MMServeError):
    """No API key was sent where one is required."""

    status = 401
    type = "unauthorized"


class Forbidden(MMServeError):
    """The API key sent is not one of the server's."""

    status = 403
    type = "forbidden"


class ModelNotFound(MMServeError):
    """The ``model_id`` names no registered model."""

    status = 404
    type = "model_not_found"


class PayloadTooLarge(MMServeError):
    status = 413
    type = "payload_too_large"


class UnsupportedMedia(MMServeError):
    """The input's format is not one the model's decoder accepts; the message lists those it does."""

    status = 415
    type = "unsupported_media"


class InvalidField(MMServeError):
    """A field of the request is missing, of the wrong type or out of range; ``field`` names it."""

    status = 422
    type = "invalid_request"


class InvalidParameter(InvalidField):
    """As :class:`InvalidField`, on the OpenAI-compatible routes: an OpenAI-compatible server
    answers a request it refuses with 400, and so do they (the request surface is the engine's)."""

    status = 400


class Unsupported(MMServeError):
    """The model does not serve this route or feature (e.g. chat on an embedding model)."""

    status = 400
    type = "unsupported"


class Overloaded(MMServeError):
    """The model's queue is full: retry later (the response carries ``Retry-After``)."""

    status = 503
    type = "overloaded"


class NotReady(MMServeError):
    """The model is starting, recovering or its engine is unhealthy."""

    status = 503
    type = "not_ready"


class DeadlineExceeded(MMServeError):
    status = 504
    type = "deadline_exceeded"


class EngineError(MMServeError):
    """The engine failed on a request that was valid; the message says what failed."""

    status = 500
    type = "engine_error"


class NotImplementedByEngine(MMServeError):
    """The engine does not implement what the request asks (an OpenAI-compatible server's 501)."""

    status = 501
    type = "not_implemented"


class RouteNotFound(MMServeError):
    """No route at this path."""

    status = 404
    type = "not_found"


class MethodNotAllowed(MMServeError):
    """The route exists, but not with this HTTP method."""

    status = 405
    type = "method_not_allowed"


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> MMServeError:
    """The first of pydantic's (or FastAPI's) validation errors of a request body, as the error
    a client sees: 400 if the body is not an object at all, else 422 naming the field."""
    e = errors[0]
    loc = [str(p) for p in e["loc"][1:]] if e["loc"] and e["loc"][0] == "body" else list(map(str, e["loc"]))
    if e["type"] == "json_invalid":
        return BadRequest(f"malformed JSON: {e.get('ctx', {}).get('error', e['msg'])}")
    if e["type"] == "model_attributes_type" or (not loc and e["type"] in ("dict_type", "model_type")):
        return BadRequest("the body must be a JSON object (sent with Content-Type: application/json)")
    if not loc and e["type"] == "missing":
        return BadRequest("a JSON body is required")
    field = ".".join(loc) or "body"
    msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
    return InvalidField(f"{field}: {msg}", field=field)
