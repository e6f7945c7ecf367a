"""The HTTP API in-process (no Ray): every route and every error of the vocabulary."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from core.config import ServerConfig
from api.app import create_app
from tests.support import FailingEngine, UnhealthyEngine, local_pipeline, local_router, model


@pytest.fixture
def client():
    router = asyncio.run(local_router(
        local_pipeline(model("echo", params={"delay_s": 0})),
        local_pipeline(model("org/failing"), FailingEngine),
    ))
    return create_app(router, ServerConfig(max_body_bytes=1000))


def call(app, method, url, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, url, **kw)
    return asyncio.run(go())


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()["error"]


def test_infer_echoes_input_with_request_id(client):
    r = call(client, "POST", "/v1/infer", json={"model_id": "echo", "input": {"x": [1, 2]}},
             headers={"x-request-id": "abc-123"})
    assert r.status_code == 200
    assert r.json() == {"model_id": "echo", "output": {"x": [1, 2]}, "finish_reason": "stop"}
    assert r.headers["x-request-id"] == "abc-123"


def test_prompt_is_an_alias_of_input(client):
    r = call(client, "POST", "/v1/infer", json={"model_id": "echo", "prompt": "hi"})
    assert r.json()["output"] == "hi"
    assert len(r.headers["x-request-id"]) == 32  # generated when the client sent none


def test_malformed_json_is_400(client):
    err = error_of(call(client, "POST", "/v1/infer", content=b"{nope",
                        headers={"content-type": "application/json"}), 400)
    assert err["type"] == "bad_request" and "malformed JSON" in err["message"]
    err = error_of(call(client, "POST", "/v1/infer", json=[1, 2]), 400)
    assert "JSON object" in err["message"]


def test_unknown_model_is_404_listing_served_ones(client):
    err = error_of(call(client, "POST", "/v1/infer", json={"model_id": "nope", "input": 1}), 404)
    assert err == {"type": "model_not_found", "model_id": "nope", "param": None, "code": 404,
                   "message": "unknown model_id 'nope'; served: echo, org/failing"}


@pytest.mark.parametrize("body,field", [
    ({"input": 1}, "model_id"),
    ({"model_id": "echo"}, "input"),
    ({"model_id": "echo", "input": 1, "prompt": "x"}, "prompt"),
    ({"model_id": "echo", "input": 1, "surprise": True}, "surprise"),
    ({"model_id": "echo", "input": 1, "params": {"delay_s": -1}}, "params.delay_s"),
    ({"model_id": "echo", "input": 1, "params": {"tempreature": 1}}, "params.tempreature"),
    ({"model_id": "echo", "input": 1, "params": "fast"}, "params"),
    ({"model_id": "org/failing", "input": "invalid"}, "input"),
])
def test_invalid_fields_are_422_naming_the_field(client, body, field):
    err = error_of(call(client, "POST", "/v1/infer", json=body), 422)
    assert err["type"] == "invalid_request"
    assert err["field"] == field and field in err["message"]


def test_body_over_the_limit_is_413(client):
    big = {"model_id": "echo", "input": "x" * 2000}
    err = error_of(call(client, "POST", "/v1/infer", json=big), 413)
    assert err["type"] == "payload_too_large" and "1000 bytes" in err["message"]

    async def chunks():  # no Content-Length: the limit still holds
        for _ in range(5):
            yield b"x" * 400
    err = error_of(call(client, "POST", "/v1/infer", content=chunks(),
                        headers={"content-type": "application/json"}), 413)
    assert err["type"] == "payload_too_large"


def test_chunked_body_under_the_limit_is_served(client):
    async def chunks():
        yield b'{"model_id": "echo", '
        yield b'"input": "streamed"}'
    r = call(client, "POST", "/v1/infer", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["output"] == "streamed"


def test_unexpected_engine_failure_is_500_and_the_next_request_works(client):
    err = error_of(call(client, "POST", "/v1/infer", json={"model_id": "org/failing", "input": "crash"}), 500)
    assert err["type"] == "internal_error" and "request id" in err["message"]
    r = call(client, "POST", "/v1/infer", json={"model_id": "org/failing", "input": "fine"})
    assert r.status_code == 200


def test_models_list_and_one(client):
    r = call(client, "GET", "/v1/models")
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["echo", "org/failing"]
    first = data[0]
    assert first["modality"] == "text" and first["engine"] == "echo" and first["status"] == "ready"
    assert first["deployment"]["placement"] == "engine" and "engine_kwargs" in first
    r = call(client, "GET", "/v1/models/org/failing")  # ids may contain slashes
    assert r.status_code == 200 and r.json()["model_id"] == "org/failing"
    err = error_of(call(client, "GET", "/v1/models/nope"), 404)
    assert err["model_id"] == "nope"


def test_health_ready_and_docs(client):
    assert call(client, "GET", "/health").json() == {"status": "ok"}
    r = call(client, "GET", "/ready")
    assert r.status_code == 200 and r.json()["models"] == {"echo": "ready", "org/failing": "ready"}
    schema = call(client, "GET", "/openapi.json").json()
    body = schema["paths"]["/v1/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/InferRequest")
    assert call(client, "GET", "/docs").status_code == 200


def test_unknown_route_and_method(client):
    assert error_of(call(client, "GET", "/v2/nothing"), 404)["type"] == "not_found"
    assert error_of(call(client, "GET", "/v1/infer"), 405)["type"] == "method_not_allowed"


def test_ready_is_503_naming_unready_models():
    router = asyncio.run(local_router(local_pipeline(model("ok")),
                                      local_pipeline(model("sick"), UnhealthyEngine)))
    client = create_app(router, ServerConfig())
    r = call(client, "GET", "/ready")
    err = error_of(r, 503)
    assert err["type"] == "not_ready" and "sick" in err["message"] and "ok" not in err["models"]
    assert r.headers["retry-after"] == "5"  # server.retry_after_s.not_ready


def test_engine_not_ready_is_503():
    router = asyncio.run(local_router(local_pipeline(model("sick"), UnhealthyEngine)))
    client = create_app(router, ServerConfig())
    err = error_of(call(client, "POST", "/v1/infer", json={"model_id": "sick", "input": 1}), 503)
    assert err["model_id"] == "sick"


def sse_data(r: httpx.Response) -> list:
    assert r.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else __import__("json").loads(d) for d in data]


def test_stream_is_server_sent_events(client):
    r = call(client, "POST", "/v1/infer", json={"model_id": "echo", "input": "hi", "stream": True})
    assert r.status_code == 200
    assert sse_data(r) == [{"model_id": "echo", "output": "hi", "finish_reason": "stop"}, "[DONE]"]


def test_stream_errors_before_the_first_chunk_are_plain_json(client):
    err = error_of(call(client, "POST", "/v1/infer",
                        json={"model_id": "echo", "input": 1, "stream": True, "params": {"x": 1}}), 422)
    assert err["field"] == "params.x"


def test_stream_failure_after_start_is_an_error_event(client):
    r = call(client, "POST", "/v1/infer", json={"model_id": "org/failing", "input": "crash", "stream": True})
    events = sse_data(r)
    assert events[0]["error"]["type"] == "internal_error" and events[-1] == "[DONE]"


def test_messages_reach_the_preprocess_node(client):
    msgs = [{"role": "user", "content": "hi"}]
    r = call(client, "POST", "/v1/infer", json={"model_id": "echo", "messages": msgs})
    assert r.json()["output"] == {"messages": msgs}
    err = error_of(call(client, "POST", "/v1/infer",
                        json={"model_id": "echo", "messages": [{"role": "robot", "content": "x"}]}), 422)
    assert err["field"].startswith("messages.0.role")


def test_openai_routes_name_what_a_model_without_them_serves(client):
    err = error_of(call(client, "POST", "/v1/chat/completions", json={
        "model": "echo", "messages": [{"role": "user", "content": "x"}]}), 400)
    assert err["type"] == "unsupported" and "use POST /v1/infer" in err["message"]
    assert err["param"] == "model"
    assert error_of(call(client, "POST", "/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    err = error_of(call(client, "POST", "/v1/completions", json={"prompt": "x"}), 400)
    assert err["param"] == "model"


def test_an_uploaded_file_handed_back_comes_as_base64(client):
    """Found by the schema fuzzer: bytes in an answer were a 500 (not JSON serializable)."""
    import base64

    r = call(client, "POST", "/v1/infer", data={"model_id": "echo"}, files={"file": ("a.png", b"\x89PNG...")})
    assert r.status_code == 200
    assert r.json()["output"] == {"data": base64.b64encode(b"\x89PNG...").decode(), "format": "png"}
