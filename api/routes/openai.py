"""The OpenAI-compatible routes (and the engines' own and Anthropic's beside them): chat,
completions, embeddings, the Responses API, Anthropic's Messages API, score, rerank, pooling and
classify, tokenize and detokenize (the audio routes are ``api.routes.audio``).

The text routes take the request surface of the model's engine: its own request models and
serving layer answer them (the engine's ``openai``), in whichever process the engine runs. This module only finds the model, applies the server's limits and deadline,
and sends the engine's answer: one JSON body, or its Server-Sent Events as they come.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.call import Call, CallDep
from api.context import check_shape
from api.errors import ERROR_RESPONSES, ERROR_SCHEMA, SSE_EVENT_SCHEMA
from api.uploads import read_json_object
from core.deadline import within_deadline
from core.errors import EngineError, InvalidParameter

router = APIRouter()

#: path -> (route name the engines know, summary, example body beyond ``model``)
ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "/v1/chat/completions": ("chat", "OpenAI chat completions (the engine's request surface)",
                             {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}),
    "/v1/completions": ("completion", "OpenAI text completions (the engine's request surface)",
                        {"prompt": "Hello", "max_tokens": 8}),
    "/v1/embeddings": ("embedding", "OpenAI embeddings", {"input": "a cat sits on the mat"}),
    "/v1/responses": ("responses", "OpenAI Responses API", {"input": "Hello", "max_output_tokens": 8}),
    "/v1/messages": ("messages", "Anthropic Messages API",
                     {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}),
    # the pooling routes, under the paths LLM servers give them
    "/score": ("score", "Scores of text pairs (the engine's /score)",
               {"queries": "What is the capital of France?", "documents": ["Paris is its capital.", "Bananas."]}),
    "/v1/score": ("score", "Scores of text pairs (the engine's /v1/score, as /score)",
                  {"queries": "What is the capital of France?", "documents": ["Paris is its capital.", "Bananas."]}),
    "/rerank": ("rerank", "Documents ranked by relevance to a query (Jina's form, the engine's /rerank)",
                {"query": "What is the capital of France?", "documents": ["Paris is its capital.", "Bananas."]}),
    "/v1/rerank": ("rerank", "Documents ranked by relevance to a query (as /rerank)",
                   {"query": "What is the capital of France?", "documents": ["Paris is its capital.", "Bananas."]}),
    "/v2/rerank": ("rerank", "Documents ranked by relevance to a query (Cohere's form, as /rerank)",
                   {"query": "What is the capital of France?", "documents": ["Paris is its capital.", "Bananas."]}),
    "/pooling": ("pooling", "The pooler's raw output (the engine's /pooling)", {"input": "a cat sits on the mat"}),
    "/classify": ("classify", "Class probabilities of a classification model (the engine's /classify)",
                  {"input": "a cat sits on the mat"}),
    "/tokenize": ("tokenize", "Tokenize a prompt or chat messages (the engine's /tokenize)", {"prompt": "Hello"}),
    "/detokenize": ("detokenize", "Token ids back to text (the engine's /detokenize)", {"tokens": [1, 2, 3]}),
}


async def _prepend(first: Any, rest: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


async def answer(call: Call, route: str):
    """Run one OpenAI-compatible request through its model's engine.

    The first answer is awaited before anything is sent, so a request the engine refuses gets
    an HTTP error (4xx naming the field) even when streamed; then a dict is the JSON body and
    strings are the stream's events."""
    body = await read_json_object(call.request)
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise InvalidParameter("model: a model id is required (GET /v1/models lists them)", field="model")
    pipeline = call.pipeline(model_id)
    for key, value in body.items():
        check_shape(value, call.server, key, model_id)
    ctx = call.context(model_id)
    chunks = pipeline.openai(route, body, ctx)
    try:
        first = await within_deadline(anext(chunks), ctx)
    except StopAsyncIteration:
        raise EngineError("the engine gave no answer", model_id=model_id) from None
    except BaseException:
        await chunks.aclose()
        raise
    if isinstance(first, dict):
        await chunks.aclose()
        return JSONResponse(first)
    return call.sse(_prepend(first, chunks), ctx)


def _route(path: str, name: str, summary: str):
    async def handler(call: CallDep):
        return await answer(call, name)

    handler.__name__ = name + path.replace("/", "_")  # one operation per path
    router.add_api_route(path, handler, methods=["POST"], summary=summary,
                         responses={200: {"content": {"application/json": {"schema": {"type": "object"}},
                                                      "text/event-stream": {"schema": SSE_EVENT_SCHEMA}}},
                                    **ERROR_RESPONSES, 501: ERROR_SCHEMA},
                         openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": f"#/components/schemas/{name}_request"}}}}})


for _path, (_name, _summary, _example) in ROUTES.items():
    _route(_path, _name, _summary)


def publish_schemas(schema: dict[str, Any], models) -> None:
    """Request schemas of the OpenAI-compatible routes for the OpenAPI document: a JSON object
    whose ``model`` is one of the models serving that route, with an example. The full
    surface is the engine's request model of the route."""
    schemas = schema["components"]["schemas"]
    for name, _summary, example in {name: (name, summary, example)
                                     for name, summary, example in ROUTES.values()}.values():
        served = sorted(p.model.model_id for p in models if name in p.openai_routes)
        model: dict[str, Any] = {"type": "string", "description": "A model_id listed by GET /v1/models."}
        if served:
            model["enum"] = served
        schemas[f"{name}_request"] = {
            "type": "object", "required": ["model"], "additionalProperties": True,
            "properties": {"model": model, "stream": {"type": "boolean"}},
            "example": {"model": served[0] if served else "my-model", **example},
            "description": "The request model of the engine serving `model` (the engine's "
                           "own); unknown fields are refused."}

