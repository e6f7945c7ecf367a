"""The HTTP API: one FastAPI app in front of every model's pipeline.

:func:`create_app` builds it around a :class:`~pipelines.router.ModelRouter`; the Ray Serve
ingress deployment (``api.ingress.Ingress``) serves it, and unit tests call it
directly with in-process pipelines. Routes live in ``api.routes``, each answering through the
one :class:`~api.call.Call` it takes; errors are rendered by ``api.errors`` and nowhere else.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.errors import error_response
from api.metrics import RequestMetrics, RouteTemplates, record_of
from api.middleware import RequestEnvelope
from api.routes import adapters, audio, infer, metrics, models, openai
from api.tracing import RequestTracing
from api.uploads import InferUpload
from core import tracing
from core.config import ServerConfig
from core.errors import BadRequest, MethodNotAllowed, MMServeError, RouteNotFound, from_validation_errors
from core.protocol import InferRequest
from pipelines.router import ModelRouter


def create_app(router: ModelRouter, server: ServerConfig, echo_request_id: bool = True,
               scrape: Callable[[list], Awaitable[bytes]] | None = None) -> FastAPI:
    """The ingress ASGI app (FastAPI, OpenAPI at ``/docs``) wrapped in :class:`RequestEnvelope`
    and, with ``server.metrics``, :class:`~api.metrics.RequestMetrics`.

    ``echo_request_id``: add ``x-request-id`` to responses (Ray Serve's proxy does it itself).
    ``scrape``: what ``GET /metrics`` answers, given the ingress's own families (the Ray
    ingress: every replica's, ``core.metrics.scrape_cluster``); default: this process's.
    """
    app = FastAPI(title="mmserve", version="0.1.0",
                  description="Many models, one HTTP API: router → preprocess → engine → postprocess.")
    app.state.router = router
    app.state.server = server
    app.state.started = int(time.time())
    app.state.schema_generation = -1
    app.state.scrape = scrape or metrics.local_scrape
    for module in (infer, openai, audio, adapters, models, metrics):
        app.include_router(module.router)

    @app.exception_handler(MMServeError)
    async def _mmserve_error(request: Request, exc: MMServeError):
        return error_response(exc, server, record_of(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(from_validation_errors(exc.errors()), server, record_of(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        err: MMServeError
        if exc.status_code == 405:
            err = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}",
                                   headers=headers)
        elif exc.status_code == 404:
            err = RouteNotFound(f"no route {request.url.path}", headers=headers)
        else:
            err = BadRequest(str(exc.detail), headers=headers)
        return error_response(err, server, record_of(request.scope))

    def openapi() -> dict:
        # /v1/infer reads its body itself (JSON or a form upload), and the OpenAI-compatible
        # routes take the engines' request models: publish their schemas.
        if app.openapi_schema is None or app.state.schema_generation != router.generation:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            served = sorted(p.model.model_id for p in router)
            for model in (InferRequest, InferUpload):
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(s.pop("$defs", {}))
                s["properties"]["model_id"]["enum"] = served
                schemas[model.__name__] = s
            openai.publish_schemas(schema, router)
            app.openapi_schema = schema
            app.state.schema_generation = router.generation  # an update changes the served ids
        return app.openapi_schema

    # FastAPI's documented way to extend the schema ("Extending OpenAPI"): replace the method
    app.openapi = openapi  # type: ignore[method-assign]

    if server.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(RequestEnvelope, max_body_bytes=server.max_body_bytes,
                       echo_request_id=echo_request_id, api_keys=server.api_keys,
                       open_paths=("/metrics",) if server.metrics_public else ())
    if tracing.enabled():  # around the envelope: what it refuses is traced too
        app.add_middleware(RequestTracing, route_of=RouteTemplates(app.routes))
    if server.metrics:  # added last: outermost, so that what the envelope refuses counts too
        app.add_middleware(RequestMetrics, routes=app.routes)
    return app
