"""The HTTP API: one FastAPI app in front of every model's pipeline.

:func:`create_app` builds it around a :class:`~nodes.router.ModelRouter`; the Ray Serve
ingress deployment (``pipelines.deployments.Ingress``) serves it, and unit tests call it
directly with in-process pipelines. Errors become JSON here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.config import ServerConfig
from core.deadline import iterate_within_deadline, within_deadline
from core.errors import InvalidField, MMServeError, NotReady, from_validation_errors
from core.protocol import InferRequest, InferResponse, RequestContext
from nodes.http import RequestEnvelope
from nodes.openai import add_openai_routes
from nodes.router import ModelRouter
from nodes.uploads import InferUpload, infer_request_body, read_infer_request
from pipelines.runner import Pipeline

logger = logging.getLogger("mmserve.ingress")

ERROR_SCHEMA = {"description": "Error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                       "model_id": {"type": ["string", "null"]}, "field": {"type": "string"}}}}}}}}


def error_response(err: MMServeError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers or None)


def internal_error(ctx: RequestContext) -> MMServeError:
    """Log the exception being handled, once, and the 500 that answers it."""
    logger.exception("request %s to %s failed", ctx.request_id, ctx.model_id)
    return MMServeError(f"internal error (request id {ctx.request_id})", model_id=ctx.model_id)


@contextmanager
def internal_errors(ctx: RequestContext):
    """Let MMServeErrors through; anything else becomes one logged 500 naming the request id."""
    try:
        yield
    except MMServeError:
        raise
    except Exception:
        raise internal_error(ctx) from None


async def sse_events(chunks: AsyncIterator[dict], ctx: RequestContext) -> AsyncIterator[bytes]:
    """Server-Sent Events: one ``data:`` event per chunk, an error event if the stream fails
    after it started (the deadline included), then ``data: [DONE]``. Closing it (client gone)
    closes ``chunks``, which cancels the work behind them."""
    try:
        async for chunk in iterate_within_deadline(chunks, ctx):
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    except MMServeError as err:
        yield b"data: " + json.dumps(err.to_dict()).encode() + b"\n\n"
    except Exception:
        yield b"data: " + json.dumps(internal_error(ctx).to_dict()).encode() + b"\n\n"
    finally:
        await chunks.aclose()  # closes the pipeline's stream now, not at garbage collection
    yield b"data: [DONE]\n\n"


def sse_response(chunks: AsyncIterator[dict], ctx: RequestContext) -> StreamingResponse:
    return StreamingResponse(sse_events(chunks, ctx), media_type="text/event-stream",
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


def request_context(body: InferRequest, request: Request, server: ServerConfig) -> RequestContext:
    """The request's context: its id, and its deadline from ``params.timeout_s`` or the
    ``x-request-timeout`` header (seconds), else ``server.request_timeout_s``, capped by
    ``server.max_request_timeout_s``. ``timeout_s`` is taken out of the params the engine sees.
    The body's shape is checked against the server's limits first."""
    for name in ("input", "prompt", "messages", "params"):
        value = getattr(body, name)
        if name == "input" and isinstance(value, dict) and "data" in value:
            value = {k: v for k, v in value.items() if k != "data"}  # media: bounded by max_bytes
        check_shape(value, server, name, body.model_id)
    raw, field = body.params.pop("timeout_s", None), "params.timeout_s"
    if raw is None and "x-request-timeout" in request.headers:
        raw, field = request.headers["x-request-timeout"], "x-request-timeout"
    timeout = server.request_timeout_s
    if raw is not None:
        try:
            timeout = float(raw)
        except (TypeError, ValueError):
            timeout = -1.0
        if not timeout > 0 or isinstance(raw, bool):
            raise InvalidField(f"{field}: must be a positive number of seconds (got {raw!r})",
                               model_id=body.model_id, field=field)
    timeout = min(timeout, server.max_request_timeout_s)
    return RequestContext(request_id=request.state.request_id, model_id=body.model_id,
                          deadline=time.time() + timeout, timeout_s=timeout)


async def run_guarded(pipeline: Pipeline, body: InferRequest, ctx: RequestContext):
    """Prepare (all client errors surface here), then the whole result, or for ``stream`` the
    chunk iterator, all within the request's deadline. Unexpected failures become one logged 500."""
    with internal_errors(ctx):
        payload, params = await within_deadline(pipeline.prepare(body, ctx), ctx)
        if body.stream:
            return pipeline.stream(payload, params, ctx)
        return await within_deadline(pipeline.complete(payload, params, ctx), ctx)


def create_app(router: ModelRouter, server: ServerConfig, echo_request_id: bool = True) -> FastAPI:
    """The ingress ASGI app (FastAPI, OpenAPI at ``/docs``) wrapped in :class:`RequestEnvelope`.

    ``echo_request_id``: add ``x-request-id`` to responses (Ray Serve's proxy does it itself).
    """
    app = FastAPI(title="mmserve", version="0.1.0",
                  description="Many models, one HTTP API: router → preprocess → engine → postprocess.")
    errors = {status: ERROR_SCHEMA for status in (400, 401, 403, 404, 413, 422, 503, 504)}
    started = int(time.time())

    @app.exception_handler(MMServeError)
    async def _mmserve_error(request: Request, exc: MMServeError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(from_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = {404: f"no route {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"
               }.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": {"type": kind, "message": msg, "model_id": None}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.post("/v1/infer", responses={200: {"model": InferResponse, "content": {
        "text/event-stream": {"schema": {"type": "string"}}}}, **errors, 415: ERROR_SCHEMA},
              summary="Run one request through a model's pipeline (streamed with stream: true)",
              openapi_extra=infer_request_body())
    async def infer(request: Request):
        body = await read_infer_request(request)
        pipeline = router.get(body.model_id)
        ctx = request_context(body, request, server)
        result = await run_guarded(pipeline, body, ctx)
        return sse_response(result, ctx) if body.stream else JSONResponse(result)

    add_openai_routes(app, router, {**errors, 415: ERROR_SCHEMA},
                      lambda body, request: request_context(body, request, server), run_guarded)

    @app.get("/v1/models", summary="Every served model, with its status")
    async def list_models():
        statuses = await router.statuses(server.status_timeout_s)
        data = [{**p.describe(), "id": p.model.model_id, "object": "model", "created": started,
                 "owned_by": "mmserve", "status": statuses[p.model.model_id]} for p in router]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", responses={404: ERROR_SCHEMA},
             summary="One served model, with its status")
    async def get_model(model_id: str):
        pipeline = router.get(model_id)
        status = await pipeline.status(server.status_timeout_s)
        return {**pipeline.describe(), "id": model_id, "object": "model", "created": started,
                "owned_by": "mmserve", "status": status}

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

    def openapi() -> dict:
        # /v1/infer reads its body itself (JSON or a form upload): publish both schemas.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (InferRequest, InferUpload):
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(s.pop("$defs", {}))
                schemas[model.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    if server.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(RequestEnvelope, max_body_bytes=server.max_body_bytes,
                       echo_request_id=echo_request_id, api_keys=server.api_keys)
    return app
