"""The HTTP API: one FastAPI app in front of every model's pipeline.

:func:`create_app` builds it around a :class:`~nodes.router.ModelRouter`; the Ray Serve
ingress deployment (``pipelines.deployments.Ingress``) serves it, and unit tests call it
directly with in-process pipelines. Errors become JSON here and nowhere else.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.config import ServerConfig
from core.errors import BadRequest, InvalidField, MMServeError, NotReady
from core.protocol import InferRequest, InferResponse, RequestContext
from nodes.http import RequestEnvelope
from nodes.router import ModelRouter

logger = logging.getLogger("mmserve.ingress")

ERROR_SCHEMA = {"description": "Error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                       "model_id": {"type": ["string", "null"]}, "field": {"type": "string"}}}}}}}}


def error_response(err: MMServeError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers or None)


def _validation_error(exc: RequestValidationError) -> MMServeError:
    e = exc.errors()[0]
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


def create_app(router: ModelRouter, server: ServerConfig, echo_request_id: bool = True) -> FastAPI:
    """The ingress ASGI app (FastAPI, OpenAPI at ``/docs``) wrapped in :class:`RequestEnvelope`.

    ``echo_request_id``: add ``x-request-id`` to responses (Ray Serve's proxy does it itself).
    """
    app = FastAPI(title="mmserve", version="0.1.0",
                  description="Many models, one HTTP API: router → preprocess → engine → postprocess.")
    errors = {status: ERROR_SCHEMA for status in (400, 404, 413, 422, 503)}

    @app.exception_handler(MMServeError)
    async def _mmserve_error(request: Request, exc: MMServeError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = {404: f"no route {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"
               }.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": {"type": kind, "message": msg, "model_id": None}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.post("/v1/infer", responses={200: {"model": InferResponse}, **errors},
              summary="Run one request through a model's pipeline")
    async def infer(body: InferRequest, request: Request):
        pipeline = router.get(body.model_id)
        ctx = RequestContext(request_id=request.state.request_id, model_id=body.model_id)
        try:
            result = await pipeline.run(body, ctx)
        except MMServeError:
            raise
        except Exception:
            logger.exception("request %s to %s failed", ctx.request_id, body.model_id)
            raise MMServeError(f"internal error (request id {ctx.request_id})", model_id=body.model_id)
        return JSONResponse(result)

    @app.get("/v1/models", summary="Every served model, with its status")
    async def list_models():
        statuses = await router.statuses(server.status_timeout_s)
        data = [{**p.describe(), "id": p.model.model_id, "object": "model", "owned_by": "mmserve",
                 "status": statuses[p.model.model_id]} for p in router]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", responses={404: ERROR_SCHEMA},
             summary="One served model, with its status")
    async def get_model(model_id: str):
        pipeline = router.get(model_id)
        status = await pipeline.status(server.status_timeout_s)
        return {**pipeline.describe(), "id": model_id, "object": "model", "owned_by": "mmserve",
                "status": status}

    @app.get("/health", summary="The ingress process is alive")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", responses={503: ERROR_SCHEMA}, summary="Every model is ready")
    async def ready():
        statuses = await router.statuses(server.status_timeout_s)
        waiting = {m: s for m, s in statuses.items() if s != "ready"}
        if waiting:
            err = NotReady("not ready: " + ", ".join(f"{m} ({s})" for m, s in waiting.items()))
            body = err.to_dict()
            body["error"]["models"] = waiting
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ready", "models": statuses}

    app.add_middleware(RequestEnvelope, max_body_bytes=server.max_body_bytes,
                       echo_request_id=echo_request_id)
    return app
