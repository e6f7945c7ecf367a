"""``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``: the LLM server's routes and
bodies for adapters loaded at run time, over every model of the ingress.

The body is the engine's (``lora_name``, ``lora_path``, ``load_inplace``...), checked by the
base model's engine with its own request model; the answer is the engine's text. One field is
added: ``base_model_name``, which names the base model where more than one served model takes
adapters (an LLM server has one model; its configured adapters use the same name). A loaded
adapter is served under its own id on every route, through the base model's pipeline
(``pipelines.router.ModelRouter.adapters``); the ingress keeps that list, and each engine
replica loads an adapter's weights when a request first needs them there.

Off unless ``server.allow_runtime_lora_updating``, as the LLM server has these routes only
when told to: a load reads any path of the serving machine.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from api.call import Call, CallDep
from api.errors import ERROR_RESPONSES
from api.uploads import read_json_object
from core.deadline import within_deadline
from core.errors import EngineError, InvalidParameter, RouteNotFound
from core.protocol import Adapter
from pipelines.runner import Pipeline

router = APIRouter()

_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **ERROR_RESPONSES}


def _name(body: dict[str, Any]) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise InvalidParameter("lora_name: the adapter's name is required (a string)", field="lora_name")
    return name


def _allowed(call: Call) -> None:
    if not call.server.allow_runtime_lora_updating:
        raise RouteNotFound("loading and unloading LoRA adapters at run time is off: "
                            "server.allow_runtime_lora_updating=true turns it on")


def _base(call: Call, body: dict[str, Any]) -> Pipeline:
    """The model an adapter is loaded into: ``base_model_name``, else the one served model that
    takes adapters."""
    takers = sorted(p.model.model_id for p in call.router if p.takes_adapters)
    base = body.pop("base_model_name", None)
    if base is None:
        if len(takers) != 1:
            raise InvalidParameter(
                "base_model_name: " + (f"several served models take LoRA adapters ({', '.join(takers)}); "
                                       "name one" if takers else "no served model takes LoRA adapters "
                                       "(its engine_kwargs.enable_lora: true)"), field="base_model_name")
        base = takers[0]
    if base not in takers:
        raise InvalidParameter(f"base_model_name: {base!r} is not a served model that takes LoRA adapters "
                               f"(those that do: {', '.join(takers) or 'none'})", field="base_model_name")
    return call.pipeline(base)


async def _engine_answer(call: Call, pipeline: Pipeline, route: str, body: dict[str, Any], adapter: Adapter) -> str:
    ctx = call.context(adapter.base)
    ctx.adapter = adapter
    chunks = pipeline.openai(route, body, ctx)
    try:
        answer = await within_deadline(anext(chunks), ctx)
    except StopAsyncIteration:
        raise EngineError("the engine gave no answer", model_id=adapter.base) from None
    finally:
        await chunks.aclose()
    return str(answer)


@router.post("/v1/load_lora_adapter", responses=_TEXT, summary="Load a LoRA adapter (the LLM server's route and body)")
async def load_lora_adapter(call: CallDep):
    _allowed(call)  # off: refused before the body is read
    body = await read_json_object(call.request)
    name = _name(body)
    pipeline = _base(call, body)
    path = body.get("lora_path")
    if not isinstance(path, str) or not path:
        raise InvalidParameter("lora_path: the adapter's path is required (a directory or a hub id)",
                               field="lora_path")
    if name in call.router.pipelines:
        raise InvalidParameter(f"lora_name: the lora adapter {name!r} conflicts with a served base model",
                               field="lora_name")
    known = call.router.adapters.get(name)
    if known is not None and not body.get("load_inplace"):
        raise InvalidParameter(f"lora_name: the lora adapter {name!r} has already been loaded. If you want "
                               "to load the adapter in place, set 'load_inplace' to True.", field="lora_name")
    if known is not None and known.base != pipeline.model.model_id:
        raise InvalidParameter(f"lora_name: the lora adapter {name!r} is an adapter of {known.base!r}",
                               field="lora_name")
    adapter = Adapter(name=name, path=path, base=pipeline.model.model_id)
    answer = await _engine_answer(call, pipeline, "load_lora_adapter", body, adapter)
    call.router.add_adapter(adapter)
    return PlainTextResponse(answer)


@router.post("/v1/unload_lora_adapter", responses=_TEXT, summary="Unload a LoRA adapter (the LLM server's route and body)")
async def unload_lora_adapter(call: CallDep):
    _allowed(call)  # off: refused before the body is read
    body = await read_json_object(call.request)
    name = _name(body)
    adapter = call.router.remove_adapter(name)  # no new request finds it from here on
    pipeline = call.pipeline(adapter.base)
    return PlainTextResponse(await _engine_answer(call, pipeline, "unload_lora_adapter", body, adapter))
