"""The one error vocabulary of mmserve.

Every failure a client can cause or observe is one of these exceptions. Each carries the HTTP
status it maps to, a stable ``type`` string, a message a user can act on, and optionally the
``model_id`` and the ``field`` involved. The ingress turns them into JSON in one place
(``nodes.ingress``); nodes and engines only raise them.
"""

from __future__ import annotations

from typing import Any


class MMServeError(Exception):
    """Base of all errors a client can see. Subclasses fix ``status`` and ``type``."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, model_id: str | None = None, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.model_id = model_id
        self.field = field
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the error response: ``{"error": {...}}``."""
        err: dict[str, Any] = {"type": self.type, "message": self.message, "model_id": self.model_id}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}

    def __reduce__(self):
        # Errors cross Ray process boundaries; keep keyword-only state through pickling.
        return (_rebuild, (type(self), self.message, self.model_id, self.field, self.headers))


def _rebuild(cls, message, model_id, field, headers):
    return cls(message, model_id=model_id, field=field, headers=headers)


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


def from_validation_errors(errors: list[dict[str, Any]]) -> MMServeError:
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
