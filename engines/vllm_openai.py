"""vLLM's own OpenAI serving layer over a :class:`~engines.vllm.VLLMEngine`'s AsyncLLM.

The request and response models, the chat template rendering, tool parsing, structured outputs,
logprobs, ``n``, ``echo``, embeddings and tokenization are vLLM's (``vllm.entrypoints``), set
up by vLLM's own server start-up from the arguments ``vllm serve`` would parse
(``engines.vllm_internals.vllm_serving_state``: those pieces are not vLLM's public API): the request
surface follows the pinned vLLM. What mmserve adds: a field that vLLM's request model does not
declare is refused (vLLM's server ignores it silently), every refusal becomes the error
vocabulary of :mod:`core.errors`, and the first event of a stream is awaited so that a request
that fails at once gets an HTTP error rather than a 200 with an error event.

A route yields one ``dict`` (the whole JSON body) when not streamed, else the SSE events as
strings, exactly as vLLM's server writes them.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator

from pydantic import BaseModel

from core.errors import (EngineError, InvalidField, InvalidParameter, MMServeError, ModelNotFound,
                         NotImplementedByEngine, NotReady, Unsupported)
from core.protocol import Adapter, RequestContext
from engines import vllm_internals

logger = logging.getLogger("mmserve.vllm")


@dataclass(frozen=True)
class Route:
    """One OpenAI-compatible route: vLLM's request model, and the handler on vLLM's app state."""

    request: str   # "module:Name" of vLLM's request model (or type alias of a union)
    handler: str   # attribute of vLLM's app state
    method: str | None  # method of the handler; None: the handler is called itself
    task: str      # what the model must support: "generate" or "embed"
    openai: str | None = None  # "module:Name" of the openai package's TypedDict of the request


ROUTES: dict[str, Route] = {
    "chat": Route("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
                  "openai_serving_chat", "create_chat_completion", "generate",
                  "openai.types.chat.completion_create_params:CompletionCreateParamsBase"),
    "completion": Route("vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                        "openai_serving_completion", "create_completion", "generate",
                        "openai.types.completion_create_params:CompletionCreateParamsBase"),
    "responses": Route("vllm.entrypoints.openai.responses.protocol:ResponsesRequest",
                       "openai_serving_responses", "create_responses", "generate",
                       "openai.types.responses.response_create_params:ResponseCreateParamsBase"),
    "messages": Route("vllm.entrypoints.anthropic.protocol:AnthropicMessagesRequest",
                      "anthropic_serving_messages", "create_messages", "generate"),
    "embedding": Route("vllm.entrypoints.pooling.embed.protocol:EmbeddingRequest",
                       "serving_embedding", None, "embed",
                       "openai.types.embedding_create_params:EmbeddingCreateParams"),
    # the pooling routes of vLLM's server: score and rerank (Jina's and Cohere's form) for an
    # embedding model (cosine similarity of the two texts' vectors) or a cross-encoder (its
    # one logit), pooling for any pooling model, classify for a classification model
    "score": Route("vllm.entrypoints.pooling.scoring.protocol:ScoreRequest", "serving_scores", None, "embed"),
    "rerank": Route("vllm.entrypoints.pooling.scoring.protocol:RerankRequest", "serving_scores", None, "embed"),
    "pooling": Route("vllm.entrypoints.pooling.pooling.protocol:PoolingRequest", "serving_pooling", None, "embed"),
    "classify": Route("vllm.entrypoints.pooling.classify.protocol:ClassificationRequest",
                      "serving_classification", None, "classify"),
    # vLLM's routes that load and unload LoRA adapters at run time (a model with enable_lora)
    "load_lora_adapter": Route("vllm.entrypoints.serve.lora.protocol:LoadLoRAAdapterRequest",
                               "openai_serving_models", "load_lora_adapter", "lora"),
    "unload_lora_adapter": Route("vllm.entrypoints.serve.lora.protocol:UnloadLoRAAdapterRequest",
                                 "openai_serving_models", "unload_lora_adapter", "lora"),
    "tokenize": Route("vllm.entrypoints.serve.tokenize.protocol:TokenizeRequest",
                      "serving_tokenization", "create_tokenize", "any"),
    "detokenize": Route("vllm.entrypoints.serve.tokenize.protocol:DetokenizeRequest",
                        "serving_tokenization", "create_detokenize", "any"),
}


def routes_for(task: str, lora: bool = False) -> frozenset[str]:
    """The routes a vLLM model of ``task`` serves (vLLM's server answers the same for it):
    ``generate`` (chat, completions, the Responses and Messages APIs), ``embed`` (embeddings,
    score, rerank, pooling), ``classify`` (classify, pooling, and score and rerank from a
    cross-encoder's one logit); tokenize and detokenize for all; with ``lora`` (vLLM's
    ``enable_lora``), loading and unloading LoRA adapters."""
    tasks = {"generate": {"generate"}, "embed": {"embed"}, "classify": {"classify"}}[task]
    if lora:
        tasks |= {"lora"}
    names = {name for name, r in ROUTES.items() if r.task in tasks or r.task == "any"}
    if task == "classify":
        names |= {"score", "rerank", "pooling"}
    return frozenset(names)


def _load(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _declared(model_cls: type[BaseModel]) -> frozenset[str]:
    """The fields (and their aliases) of one of vLLM's request models."""
    names = set()
    for name, field in model_cls.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return frozenset(names)


@functools.cache
def _reader(route: str):
    """``(validator of vLLM's request model, OpenAI's own field names)`` of ``route``, built
    once per process: both are costly to build and every request needs them."""
    import typing

    from pydantic import TypeAdapter

    spec = ROUTES[route]
    openai_fields = frozenset(typing.get_type_hints(_load(spec.openai))) if spec.openai else frozenset()
    return TypeAdapter(_load(spec.request)), openai_fields


_ignored_logged: set[tuple[str, str]] = set()


def parse_request(route: str, body: dict[str, Any], model_id: str):
    """``body`` as vLLM's request model of ``route``. Raises InvalidParameter (400) naming the
    first invalid field, or a field that neither vLLM's model nor OpenAI's API declares. A
    field of OpenAI's API that vLLM does not declare is ignored, as vLLM's server ignores it,
    and logged once per field."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMValidationError

    adapter, openai_fields = _reader(route)
    try:
        request = adapter.validate_python(body)
    except VLLMValidationError as err:  # a model-level check of vLLM's (not a ValueError since 0.32)
        field = err.parameter or "body"
        raise InvalidParameter(f"{field}: {err.args[0] if err.args else err}", model_id=model_id,
                               field=field) from None
    except ValidationError as err:
        e = err.errors()[0]
        loc = [str(p) for p in e["loc"]]
        # a union's member name leads the location: drop it, keep the field's path
        if loc and "Request" in loc[0]:
            loc = loc[1:]
        msg = e["msg"].removeprefix("Value error, ")
        named = re.search(r"\(parameter=([\w.]+)", msg)
        field = ".".join(loc) or (named.group(1) if named else "body")
        raise InvalidParameter(f"{field}: {msg}", model_id=model_id, field=field) from None
    request_cls: type[BaseModel] = type(request)  # one of vLLM's pydantic request models
    extra = set(body) - _declared(request_cls)
    unknown = sorted(extra - openai_fields)
    if unknown:
        raise InvalidParameter(f"{unknown[0]}: unknown field (neither vLLM's {type(request).__name__} "
                               f"nor OpenAI's API has it)", model_id=model_id, field=unknown[0])
    for name in sorted(extra):
        if (route, name) not in _ignored_logged:
            _ignored_logged.add((route, name))
            logger.warning("%s requests: field %r is OpenAI's but vLLM ignores it; so does mmserve",
                           route, name)
    return request


def error_of(err: BaseException | Any, model_id: str) -> MMServeError:
    """vLLM's answer to a request it refused (an exception, or an ``ErrorResponse``) as the
    error vocabulary, with vLLM's status, message and parameter."""
    if isinstance(err, MMServeError):
        return err
    if isinstance(err, BaseException):
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(err, EngineDeadError):
            return NotReady("the vLLM engine died; the replica is restarting", model_id=model_id,
                            retry="engine_dead")
        err = vllm_internals.vllm_error_response(err)
    info = err.error
    cls = {400: InvalidParameter, 404: ModelNotFound, 422: InvalidField,
           501: NotImplementedByEngine}.get(info.code, EngineError)
    return cls(info.message, model_id=model_id, field=info.param)


def _event_error(event: str, model_id: str) -> MMServeError | None:
    """The error of an SSE event that carries one (``data: {"error": ...}``), else None."""
    if not event.startswith('data: {"error"'):
        return None
    try:
        info = json.loads(event[len("data: "):])["error"]
    except (ValueError, KeyError, TypeError):
        return None
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    return error_of(ErrorResponse(error=ErrorInfo(message=str(info.get("message")),
                                                  type=str(info.get("type", "BadRequestError")),
                                                  param=info.get("param"),
                                                  code=int(info.get("code", 400)))), model_id)


class OpenAIFrontend:
    """vLLM's serving objects for one model, built as ``vllm serve`` builds them."""

    def __init__(self, model_id: str, served_routes: frozenset[str]) -> None:
        self.model_id = model_id
        self.routes = served_routes
        #: vLLM's app state (its serving objects), once :meth:`start` built it
        self.state: Any = None
        #: adapters' paths as given -> as vLLM reads them (a generated one resolved once)
        self._paths: dict[str, str] = {}

    async def start(self, llm, model_path: str, options: dict[str, Any]) -> None:
        """Build vLLM's app state over ``llm`` as ``vllm serve`` with ``options`` (vLLM's, by
        name) would. Raises RuntimeError naming the vLLM version if this vLLM builds it
        otherwise."""
        args = vllm_internals.vllm_server_args(model_path, self.model_id, options)
        self.state = await vllm_internals.vllm_serving_state(llm, args)

    async def model_card(self) -> dict[str, Any]:
        """vLLM's ``/v1/models`` entry of this model (``max_model_len``, ``root``, ``permission``)."""
        cards = await vllm_internals.vllm_model_cards(self.state)
        return cards[0] if cards else {}

    async def call(self, route: str, body: dict[str, Any], ctx: RequestContext) -> AsyncIterator[Any]:
        """Answer one OpenAI-compatible request: one dict (not streamed) or SSE strings."""
        if route not in self.routes:
            raise Unsupported(f"model {self.model_id!r} does not serve this route "
                              f"(it serves: {', '.join(sorted(self.routes))})", model_id=self.model_id)
        request = parse_request(route, body, self.model_id)
        spec = ROUTES[route]
        if spec.task == "lora":
            yield await self._adapter_route(route, request)
            return
        if ctx.adapter is not None:  # vLLM's serving layer then finds it by the body's model
            await self.adapter(ctx.adapter)
        if route == "chat" and not vllm_internals.vllm_is_multimodal(self.state):
            self._text_only(body)
        handler = vllm_internals.vllm_route_handler(self.state, spec.handler)
        if handler is None:
            raise Unsupported(f"model {self.model_id!r} does not serve {route}", model_id=self.model_id)
        call = handler if spec.method is None else getattr(handler, spec.method)
        try:
            # with a trace, vLLM reads its context from the request's headers (its span goes under the engine's)
            result = await call(request, None if ctx.trace is None else vllm_internals.vllm_raw_request(ctx.trace))
        except MMServeError:
            raise
        except Exception as err:
            error = error_of(err, self.model_id)
            if route == "chat" and error.field == "logprobs" and "top_logprobs" in body:
                error.field = "top_logprobs"  # vLLM names its internal parameter for chat's field
            raise error from None
        async for item in self._answer(result):
            yield item

    async def adapter(self, adapter: Adapter) -> Any:
        """vLLM's ``LoRARequest`` of ``adapter``, registered with vLLM's serving layer first
        where it is not yet (an adapter loaded through another replica, or one of the config's
        after a restart) or is from another path. vLLM's engine loads its weights when a
        request first needs them and keeps at most ``max_loras`` of them in a batch and
        ``max_cpu_loras`` in memory, evicting the least recently used."""
        from engines.checkpoints import resolve_source

        path = self._paths.get(adapter.path) or self._paths.setdefault(adapter.path, resolve_source(adapter.path))
        known = vllm_internals.vllm_loras(self.state).get(adapter.name)
        if known is None or known.lora_path != path:
            await self._adapter_route("load_lora_adapter", parse_request(
                "load_lora_adapter", {"lora_name": adapter.name, "lora_path": path,
                                      "load_inplace": known is not None}, self.model_id))
        return vllm_internals.vllm_loras(self.state)[adapter.name]

    async def _adapter_route(self, route: str, request) -> str:
        """vLLM's load or unload of an adapter, answered with vLLM's text. A load resolves a
        ``generated:`` path and names this model as the base; a failed load is the client's
        400 naming ``lora_path``, with vLLM's reason. Unloading an adapter that this replica
        never loaded succeeds: the ingress keeps the list of adapters (``pipelines.router``)."""
        from engines.checkpoints import resolve_source
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        models = vllm_internals.vllm_serving_models(self.state)
        if route == "load_lora_adapter":
            request.lora_path = resolve_source(request.lora_path)
            known = vllm_internals.vllm_loras(self.state).get(request.lora_name)
            if known is not None and known.lora_path == request.lora_path and not request.load_inplace:
                return f"Success: LoRA adapter '{request.lora_name}' added successfully."  # held here already
            request.load_inplace = request.load_inplace or known is not None
            result = await models.load_lora_adapter(request, base_model_name=self.model_id)
            if isinstance(result, ErrorResponse):
                raise InvalidParameter(f"lora_path: adapter {request.lora_name!r} from {request.lora_path!r} "
                                       f"cannot be loaded: {result.error.message}", model_id=self.model_id,
                                       field="lora_path")
            return result
        if request.lora_name not in vllm_internals.vllm_loras(self.state):
            return f"Success: LoRA adapter '{request.lora_name}' removed successfully."
        result = await models.unload_lora_adapter(request)
        if isinstance(result, ErrorResponse):
            raise error_of(result, self.model_id)
        return result

    def _text_only(self, body: dict[str, Any]) -> None:
        """Refuse, naming the part, a non-text content part sent to a text-only model (vLLM's
        own words, "not a multimodal model", name neither the part nor its place)."""
        for i, message in enumerate(body.get("messages") or ()):
            content = message.get("content") if isinstance(message, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else ()):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", None):
                    field = f"messages.{i}.content.{j}"
                    raise InvalidParameter(f"{field}: an {kind!r} part, but model {self.model_id!r} "
                                           f"takes text only", model_id=self.model_id, field=field)

    async def _answer(self, result) -> AsyncIterator[Any]:
        from starlette.responses import Response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if isinstance(result, ErrorResponse):
            raise error_of(result, self.model_id)
        if isinstance(result, Response):  # the pooling routes answer with a response
            body = json.loads(bytes(result.body))  # a rendered response's body: bytes
            if result.status_code >= 400:
                raise error_of(ErrorResponse.model_validate(body), self.model_id)
            yield body
            return
        if isinstance(result, BaseModel):
            yield result.model_dump()
            return
        first = True
        async for event in result:
            if not isinstance(event, str):  # the Responses API streams event objects
                event = (f"event: {getattr(event, 'type', 'unknown')}\n"
                         f"data: {event.model_dump_json(by_alias=True)}\n\n")
            if first and (err := _event_error(event, self.model_id)) is not None:
                raise err  # nothing was sent yet: the client gets it as an HTTP error
            first = False
            yield event
