"""``POST /v1/infer``: one request through a model's pipeline, JSON or a form upload."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.context import json_response, pipeline_of, request_context, run_guarded, sse_response
from api.errors import ERROR_RESPONSES, SSE_EVENT_SCHEMA
from api.uploads import infer_request_body, read_infer_request
from core.protocol import InferResponse

router = APIRouter()


@router.post("/v1/infer", responses={200: {"model": InferResponse, "content": {
    "text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}, **ERROR_RESPONSES},
             summary="Run one request through a model's pipeline (streamed with stream: true)",
             openapi_extra=infer_request_body())
async def infer(request: Request):
    state = request.app.state
    body = await read_infer_request(request)
    pipeline = pipeline_of(request, body.model_id)
    ctx = request_context(body, request, state.server)
    result = await run_guarded(pipeline, body, ctx)
    return sse_response(result, ctx, request.state) if body.stream else json_response(result)
