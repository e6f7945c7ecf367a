"""Reusable pieces for tests: engines with controllable behaviour, in-process apps, free ports."""

from __future__ import annotations

from typing import AsyncIterator

from core.config import ModelConfig, NodeSpec, ServerConfig
from core.errors import InvalidField, NotReady
from core.protocol import Adapter, EngineResult, RequestContext
from engines.base import Engine, Hosting
from core.protocol import NoOptions
from engines.echo import EchoEngine
from nodes.common import Identity, Result
from pipelines.router import ModelRouter
from pipelines.runner import Pipeline
from pipelines.stages import LocalEngine, LocalNode

#: for a test's own Ray, whose ingress has no load balancer to wait for when it stops: the
#: ingress stops without the 5 s drain of ``conf/server/default.yaml`` (decision 0008). Its
#: requests in flight still finish first.
NO_INGRESS_DRAIN = "++server.serve_env.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0"


class FailingEngine(Engine):
    """Raises what the input says: "invalid" → InvalidField, "crash" → RuntimeError."""

    async def infer(self, inputs, params, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        if inputs == "invalid":
            raise InvalidField("input: not acceptable", model_id=ctx.model_id, field="input")
        if inputs == "crash":
            raise RuntimeError("boom")
        yield EngineResult(output=inputs, finish_reason="stop")


class UnhealthyEngine(Engine):
    async def infer(self, inputs, params, ctx):
        raise NotReady("engine core is down", model_id=ctx.model_id)
        yield  # pragma: no cover

    async def check_health(self) -> None:
        raise NotReady("engine core is down")


class ScriptedOpenAIEngine(Engine):
    """Speaks an OpenAI protocol of its own making: ``chat`` and ``completion`` answer the body
    back (as one dict, or streamed as pre-framed SSE events ``data: {"n": i}`` then
    ``data: [DONE]``); ``"refuse": "<field>"`` is refused naming it; ``"delay_s"`` waits first."""

    @classmethod
    def hosting(cls, model) -> Hosting:
        return Hosting(routes=frozenset({"chat", "completion"}))

    async def infer(self, inputs, params, ctx):
        yield EngineResult(output=inputs, finish_reason="stop")

    async def openai(self, route, body, ctx):
        import asyncio
        import json

        from core.errors import InvalidParameter

        if "refuse" in body:
            raise InvalidParameter(f"{body['refuse']}: refused", model_id=ctx.model_id, field=body["refuse"])
        if body.get("stream"):
            for i in range(body.get("events", 2)):
                yield f"data: {json.dumps({'route': route, 'n': i})}\n\n"
                await asyncio.sleep(body.get("delay_s", 0))
            yield "data: [DONE]\n\n"
            return
        await asyncio.sleep(body.get("delay_s", 0))
        yield {"route": route, "body": body}


class ScriptedAdapterEngine(Engine):
    """Takes adapters as a vLLM engine with ``enable_lora`` does, in a protocol of its own
    making: its config's adapter ``static`` (path ``/adapters/static``), loads of any path but
    one containing "bad" (refused naming ``lora_path``), and answers that name the adapter the
    request reached it with (``ctx.adapter``)."""

    @classmethod
    def hosting(cls, model) -> Hosting:
        return Hosting(routes=frozenset({"completion", "load_lora_adapter", "unload_lora_adapter"}),
                       adapters=(Adapter(f"{model.model_id}-static", "/adapters/static", model.model_id),),
                       takes_adapters=True)

    async def infer(self, inputs, params, ctx):
        yield EngineResult(output={"input": inputs, "adapter": ctx.adapter and ctx.adapter.name},
                           finish_reason="stop")

    async def openai(self, route, body, ctx):
        from core.errors import InvalidParameter

        if route == "load_lora_adapter":
            if "bad" in body["lora_path"]:
                raise InvalidParameter(f"lora_path: no adapter at {body['lora_path']!r}",
                                       model_id=ctx.model_id, field="lora_path")
            yield f"Success: LoRA adapter '{body['lora_name']}' added successfully."
        elif route == "unload_lora_adapter":
            yield f"Success: LoRA adapter '{body['lora_name']}' removed successfully."
        else:
            yield {"model": body["model"], "adapter": ctx.adapter and ctx.adapter.path, "base": ctx.adapter and ctx.adapter.base}


class VLLMProtocolEngine(Engine):
    """Reads every OpenAI-compatible request with vLLM's own request models, as the vLLM engine
    does (``engines.vllm_openai.parse_request``), and answers a fixed body: the API's handling
    of vLLM's request surface, without an engine behind it."""

    @classmethod
    def hosting(cls, model) -> Hosting:
        from engines.vllm_openai import routes_for

        return Hosting(routes=routes_for("generate"))

    async def infer(self, inputs, params, ctx):
        yield EngineResult(output=inputs, finish_reason="stop")

    async def openai(self, route, body, ctx):
        from engines.vllm_openai import parse_request

        request = parse_request(route, body, ctx.model_id)
        if getattr(request, "stream", False):
            yield "data: {}\n\n"
            yield "data: [DONE]\n\n"
        else:
            yield {"object": route, "model": ctx.model_id}


def model(model_id: str, **kw) -> ModelConfig:
    return ModelConfig(model_id=model_id, modality="text", pipeline="echo", engine="echo", **kw)


def local_pipeline(m: ModelConfig, engine_cls: type[Engine] = EchoEngine) -> Pipeline:
    p = Pipeline(m, LocalNode(Identity({}, m)), LocalEngine(engine_cls(m)), LocalNode(Result({}, m)))
    p.params_schema = engine_cls.Params
    hosting = engine_cls.hosting(m)
    p.openai_routes, p.adapters, p.takes_adapters = hosting.routes, hosting.adapters, hosting.takes_adapters
    return p


async def local_router(*pipelines: Pipeline) -> ModelRouter:
    router = ModelRouter(list(pipelines))
    await router.start()
    return router


def inline_spec(spec):
    """A RouteSpec with every step of its model in this process (``placement: inline``)."""
    dep = spec.model.deployment.model_copy(update={"placement": "inline"})
    return spec.model_copy(update={"model": spec.model.model_copy(update={"deployment": dep})})


def inline_router(cfg) -> ModelRouter:
    """A router over every model of a composed config, each step built in this process."""
    from apps.builder import route_specs
    from pipelines.deployments import pipeline_for

    return ModelRouter([pipeline_for(inline_spec(s)) for s in route_specs(cfg)])


def metric_families(response) -> list:
    """The metric families of a ``GET /metrics`` answer, parsed by prometheus_client's own
    text parser (the answer must be a 200)."""
    from prometheus_client.parser import text_string_to_metric_families

    assert response.status_code == 200, response.text
    return list(text_string_to_metric_families(response.text))


def engine_core_processes(model_id: str) -> list:
    """The vLLM engine core processes of ``model_id``: children of its engine replica, or its
    engine core actor (``placement: remote_core``). vLLM retitles the process; its name holds
    the title's first 15 characters."""
    import psutil

    from engines.vllm_core import CORE_OF

    def of_model(p) -> bool:
        try:
            if p.environ().get(CORE_OF) == model_id:  # the actor's process (the core runs in it)
                return True
            return ("EngineCor" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])
                    and any(f"{model_id}.engine" in " ".join(a.cmdline()) for a in p.parents()))
        except psutil.Error:  # gone meanwhile, or not ours to read
            return False

    return [p for p in psutil.process_iter(["name", "cmdline"]) if of_model(p)]


__all__ = ["engine_core_processes", "metric_families", "FailingEngine", "ScriptedOpenAIEngine", "VLLMProtocolEngine", "UnhealthyEngine", "NoOptions", "NodeSpec", "ServerConfig",
           "inline_router", "local_pipeline", "local_router", "model"]
