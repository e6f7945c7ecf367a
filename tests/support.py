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


class OTLPReceiver:
    """An OTLP/HTTP traces receiver on a free local port (``url``: its ``/v1/traces``): it
    decodes each export (protobuf, ``ExportTraceServiceRequest``) into plain span dicts, with
    the resource of the process that sent it. ``with`` starts and stops it."""

    def __init__(self) -> None:
        import threading

        self.url = ""  # once started, on the port the system gave it
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def __enter__(self) -> "OTLPReceiver":
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                export = ExportTraceServiceRequest()
                export.ParseFromString(body)
                receiver._add(export)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _value(v):
        kind = v.WhichOneof("value")
        return getattr(v, kind) if kind else None

    def _add(self, export) -> None:
        spans = []
        for rs in export.resource_spans:
            resource = {a.key: self._value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({
                        "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_id": s.parent_span_id.hex() or None, "kind": s.kind,
                        "attributes": {a.key: self._value(a.value) for a in s.attributes},
                        "status": s.status.code, "events": [e.name for e in s.events],
                        "resource": resource, "scope": ss.scope.name})
        with self.lock:
            self.spans.extend(spans)

    def trace(self, trace_id: str, until=lambda spans: True, timeout_s: float = 30.0) -> list[dict]:
        """The spans of ``trace_id`` received, once ``until(spans)`` holds (the exporters send
        in batches, every few seconds), or what there is after ``timeout_s``."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                spans = [s for s in self.spans if s["trace_id"] == trace_id]
            if until(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.2)  # polling what the exporters have sent
