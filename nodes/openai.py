"""OpenAI-compatible routes: ``/v1/chat/completions`` and ``/v1/completions`` (streamed or not),
and ``/v1/audio/transcriptions`` (multipart upload, served by a speech recognition pipeline).

They translate OpenAI's request shape into an :class:`~core.protocol.InferRequest`, run the
same pipeline as ``/v1/infer``, and shape the answer (or the SSE chunks) as OpenAI does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from core.errors import InvalidField
from core.protocol import ChatMessage, InferRequest
from nodes.router import ModelRouter

SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty",
            "stop", "seed")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="A model_id listed by GET /v1/models.")
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="vLLM extension; -1 is off.")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SAMPLING if getattr(self, k) is not None}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens.")

    def infer_request(self) -> InferRequest:
        params = self.params()
        if self.max_completion_tokens is not None:
            params.setdefault("max_tokens", self.max_completion_tokens)
        return InferRequest(model_id=self.model, messages=self.messages, params=params, stream=self.stream)


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        ..., description="One prompt (a list of exactly one is accepted).")

    def infer_request(self) -> InferRequest:
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return InferRequest(model_id=self.model, prompt=prompt, params=self.params(), stream=self.stream)


def _text(output: Any) -> str:
    return output if isinstance(output, str) else json.dumps(output)


def _usage(u: dict | None) -> dict[str, int]:
    p, c = (u or {}).get("prompt_tokens", 0), (u or {}).get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def add_openai_routes(app: FastAPI, router: ModelRouter, errors: dict, context: Callable,
                      run_guarded: Callable) -> None:
    """Register the OpenAI-compatible routes on the ingress app.

    ``context(infer_request, request)`` and ``run_guarded(pipeline, infer_request, ctx)`` are the
    ingress's own way to run a request: the latter returns the whole result, or an async
    iterator of chunks for ``stream: true``.
    """
    from nodes.ingress import sse_response

    async def run(body: _Common, request: Request, kind: str, shape_one: Callable, shape_chunk: Callable):
        req = body.infer_request()
        pipeline = router.get(req.model_id)
        ctx = context(req, request)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {"id": rid, "created": created, "model": req.model_id}
        result = await run_guarded(pipeline, req, ctx)
        if not req.stream:
            return JSONResponse({**base, **shape_one(result), "usage": _usage(result.get("usage"))})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks() -> AsyncIterator[dict]:
            last = None
            first = True
            async for chunk in result:
                last = chunk
                yield {**base, **shape_chunk(chunk, first)}
                first = False
            if include_usage and last is not None:
                yield {**base, "object": shape_chunk(last, False)["object"], "choices": [],
                       "usage": _usage(last.get("usage"))}

        return sse_response(chunks(), ctx)

    @app.post("/v1/chat/completions", responses=errors, summary="OpenAI-compatible chat completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        def one(r):
            return {"object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": _text(r["output"])},
                "finish_reason": r.get("finish_reason"), "logprobs": None}]}

        def chunk(c, first):
            delta = {"content": _text(c["output"])}
            if first:
                delta["role"] = "assistant"
            return {"object": "chat.completion.chunk", "choices": [{
                "index": 0, "delta": delta, "finish_reason": c.get("finish_reason"), "logprobs": None}]}

        return await run(body, request, "chat", one, chunk)

    @app.post("/v1/completions", responses=errors, summary="OpenAI-compatible text completions")
    async def completions(body: CompletionRequest, request: Request):
        def one(r):
            return {"object": "text_completion", "choices": [{
                "index": 0, "text": _text(r["output"]), "finish_reason": r.get("finish_reason"),
                "logprobs": None}]}

        # A streamed text completion chunk has the same shape as the whole answer.
        return await run(body, request, "completion", one, lambda c, first: one(c))

    @app.post("/v1/audio/transcriptions", responses=errors, summary="OpenAI-compatible speech to text")
    async def transcriptions(
        request: Request,
        file: UploadFile = File(..., description="The audio file (wav, flac, mp3, ogg)."),
        model: str = Form(..., min_length=1, description="A speech recognition model_id."),
        language: str | None = Form(None, description="Accepted; the model decides the language."),
        prompt: str | None = Form(None, description="Accepted and ignored (CTC models take no prompt)."),
        response_format: Literal["json", "text", "verbose_json"] = Form("json"),
        temperature: float | None = Form(None, description="Accepted and ignored (greedy decoding)."),
    ):
        from nodes.uploads import uploaded_media

        pipeline = router.get(model)
        if pipeline.model.modality != "audio":
            raise InvalidField(f"model: {model!r} is a {pipeline.model.modality} model; transcriptions "
                               f"need a speech recognition model", model_id=model, field="model")
        req = InferRequest(model_id=model, input=await uploaded_media(file))
        result = await run_guarded(pipeline, req, context(req, request))
        output = result["output"]
        if not isinstance(output, dict) or "text" not in output:
            raise InvalidField(f"model: {model!r} does not transcribe speech (its pipeline answers "
                               f"{pipeline.model.pipeline!r} results)", model_id=model, field="model")
        if response_format == "text":
            return PlainTextResponse(output["text"])
        if response_format == "verbose_json":
            return {"task": "transcribe", "language": language or "english",
                    "duration": result.get("duration_s"), "text": output["text"], "segments": []}
        return {"text": output["text"]}
