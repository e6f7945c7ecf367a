"""Traces of requests, no Ray (``core.tracing``, ``api.tracing``): the ingress's span joins a
client's ``traceparent`` and its trace id comes back in ``x-trace-id``; each step has its span
under it; a stream's first chunk is timed at the engine and at the ingress; errors are recorded;
off (the default), no header, no span, no trace carried. Spans go through the SDK's in-memory
exporter; that the launcher's variables reach every process and spans cross processes to a real
OTLP receiver is tests/integration/vllm/test_tracing.py's."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from api.app import create_app
from core import tracing
from core.config import ServerConfig
from tests.support import FailingEngine, local_pipeline, local_router, model

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture
def spans(monkeypatch):
    """Tracing on in this process, into an in-memory exporter (not the global provider)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    return exporter


def _app():
    router = asyncio.run(local_router(local_pipeline(model("echo", params={"delay_s": 0})),
                                      local_pipeline(model("failing"), FailingEngine)))
    return create_app(router, ServerConfig())


def _post(app, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body, headers=headers or {})
    return asyncio.run(go())


def _by_name(exporter) -> dict:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_a_request_is_one_trace_under_the_clients_span_each_step_under_the_ingress(spans):
    r = _post(_app(), "/v1/infer", {"model_id": "echo", "input": "hi"}, {"traceparent": TRACEPARENT})
    assert r.status_code == 200 and r.json()["output"] == "hi"
    assert r.headers["x-trace-id"] == CLIENT_TRACE
    got = _by_name(spans)
    ingress = got["POST /v1/infer"]
    assert ingress.context.trace_id == int(CLIENT_TRACE, 16)
    assert ingress.parent.span_id == int(CLIENT_SPAN, 16) and ingress.parent.is_remote
    assert ingress.attributes["http.response.status_code"] == 200
    assert ingress.attributes["mmserve.model_id"] == "echo" and ingress.attributes["http.route"] == "/v1/infer"
    for step in ("preprocess", "engine", "postprocess"):
        assert got[step].parent.span_id == ingress.context.span_id, step
        assert got[step].attributes["mmserve.model_id"] == "echo"
        assert got[step].attributes["mmserve.request_id"] == r.headers["x-request-id"]


def test_a_request_without_a_traceparent_starts_its_own_trace(spans):
    r = _post(_app(), "/v1/infer", {"model_id": "echo", "input": "hi"})
    ingress = _by_name(spans)["POST /v1/infer"]
    assert ingress.parent is None and r.headers["x-trace-id"] == f"{ingress.context.trace_id:032x}"


def test_a_streams_first_chunk_is_timed_at_the_engine_and_at_the_client(spans):
    r = _post(_app(), "/v1/infer", {"model_id": "echo", "input": "a b c", "stream": True},
              {"traceparent": TRACEPARENT})
    assert r.status_code == 200 and "text/event-stream" in r.headers["content-type"]
    got = _by_name(spans)
    engine, ingress = got["engine"], got["POST /v1/infer"]
    assert 0 < engine.attributes["mmserve.time_to_first_chunk_s"] <= ingress.attributes["mmserve.time_to_first_chunk_s"]
    assert engine.parent.span_id == ingress.context.span_id


def test_errors_are_recorded_on_the_step_that_failed_and_on_the_request(spans):
    r = _post(_app(), "/v1/infer", {"model_id": "failing", "input": "invalid"}, {"traceparent": TRACEPARENT})
    assert r.status_code == 422
    got = _by_name(spans)
    engine, ingress = got["engine"], got["POST /v1/infer"]
    assert engine.status.status_code.name == "ERROR" and engine.attributes["error.type"] == "invalid_request"
    assert [e.name for e in engine.events] == ["exception"]
    assert ingress.attributes["error.type"] == "invalid_request"
    assert ingress.attributes["http.response.status_code"] == 422
    assert ingress.status.status_code.name == "UNSET"  # a client's error is not the server's
    # refused before any route: an unknown model is traced too, with its error type
    r = _post(_app(), "/v1/infer", {"model_id": "nobody", "input": "x"})
    assert r.status_code == 404 and "x-trace-id" in r.headers


def test_off_by_default_no_header_no_span_no_context():
    assert not tracing.enabled()
    app = _app()
    r = _post(app, "/v1/infer", {"model_id": "echo", "input": "hi"}, {"traceparent": TRACEPARENT})
    assert r.status_code == 200 and "x-trace-id" not in r.headers
    assert tracing.carrier() is None


def test_the_endpoint_is_the_sdks_variables_and_the_launcher_passes_them_on(monkeypatch):
    from apps.serving import serve_env

    assert tracing.endpoint({}) is None
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/x"}) == "http://t:9/x"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "shop")
    env = serve_env(ServerConfig(http_proxy="ray", tracing_endpoint="http://c:4318/v1/traces"), local=False)
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://c:4318/v1/traces"
    assert env["OTEL_SERVICE_NAME"] == "shop" and env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    assert not any(k.startswith("OTEL_") for k in serve_env(ServerConfig(http_proxy="ray"), local=False))
