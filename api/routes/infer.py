"""``POST /v1/infer``: one request through a model's pipeline, JSON or a form upload."""

from __future__ import annotations

from fastapi import APIRouter

from api.call import CallDep
from api.context import run_pipeline
from api.errors import ERROR_RESPONSES, SSE_EVENT_SCHEMA
from api.uploads import infer_request_body, read_infer_request
from core.protocol import InferResponse

router = APIRouter()


@router.post("/v1/infer", responses={200: {"model": InferResponse, "content": {
    "text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}, **ERROR_RESPONSES},
             summary="Run one request through a model's pipeline (streamed with stream: true)",
             openapi_extra=infer_request_body())
async def infer(call: CallDep):
    body = await read_infer_request(call.request)
    pipeline = call.pipeline(body.model_id)
    ctx = call.infer_context(body)
    result = await run_pipeline(pipeline, body, ctx)
    return call.sse(result, ctx) if body.stream else call.json(result)
