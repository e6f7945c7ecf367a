"""Deadlines, API keys and CORS at the ingress (in-process, no Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.config import ServerConfig
from api.app import create_app
from tests.support import local_pipeline, local_router, model
from tests.unit.test_ingress import call, error_of, sse_data


def app_with(**server) -> object:
    router = asyncio.run(local_router(local_pipeline(model("echo"))))
    return create_app(router, ServerConfig(**server))


def slow(delay: float, **extra) -> dict:
    return {"model_id": "echo", "input": "x", "params": {"delay_s": delay, **extra}}


def test_deadline_from_params_gives_504_naming_the_step():
    app = app_with()
    t0 = time.monotonic()
    err = error_of(call(app, "POST", "/v1/infer", json=slow(2, timeout_s=0.2)), 504)
    assert time.monotonic() - t0 < 1.5
    assert err["type"] == "deadline_exceeded" and "0.2s" in err["message"] and "engine" in err["message"]


def test_deadline_from_header_and_the_server_cap():
    app = app_with(max_request_timeout_s=0.2)
    assert error_of(call(app, "POST", "/v1/infer", json=slow(1), headers={"x-request-timeout": "30"}), 504)
    assert call(app, "POST", "/v1/infer", json=slow(0.01)).status_code == 200


def test_default_deadline_and_fast_requests_pass():
    app = app_with(request_timeout_s=0.2)
    assert error_of(call(app, "POST", "/v1/infer", json=slow(1)), 504)
    assert call(app, "POST", "/v1/infer", json=slow(0.01, timeout_s=5)).status_code == 200


@pytest.mark.parametrize("bad", [0, -1, "soon", True])
def test_invalid_timeout_is_422(bad):
    err = error_of(call(app_with(), "POST", "/v1/infer", json=slow(0, timeout_s=bad)), 422)
    assert err["field"] == "params.timeout_s"
    err = error_of(call(app_with(), "POST", "/v1/infer", json=slow(0), headers={"x-request-timeout": "x"}), 422)
    assert err["field"] == "x-request-timeout"


def test_stream_deadline_is_an_error_event():
    r = call(app_with(), "POST", "/v1/infer", json={**slow(2, timeout_s=0.2), "stream": True})
    events = sse_data(r)
    assert events[0]["error"]["type"] == "deadline_exceeded" and events[-1] == "[DONE]"


def test_api_keys_guard_every_route_but_health():
    app = app_with(api_keys=["k1", "k2"])
    assert call(app, "GET", "/health").status_code == 200
    for path in ("/v1/models", "/ready", "/docs", "/openapi.json"):
        r = call(app, "GET", path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    err = error_of(call(app, "POST", "/v1/infer", json=slow(0), headers={"authorization": "Bearer nope"}), 403)
    assert err["type"] == "forbidden" and "nope" not in err["message"]
    assert error_of(call(app, "GET", "/v1/models", headers={"authorization": "Basic k1"}), 401)
    r = call(app, "POST", "/v1/infer", json=slow(0), headers={"authorization": "Bearer k2"})
    assert r.status_code == 200


def test_cors_is_closed_by_default_and_opens_per_origin():
    preflight = {"origin": "https://ui.example", "access-control-request-method": "POST"}
    r = call(app_with(), "OPTIONS", "/v1/infer", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = call(app_with(cors_origins=["https://ui.example"], api_keys=["k"]), "OPTIONS", "/v1/infer",
             headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"


def test_inline_engine_admits_ongoing_plus_queued_and_refuses_the_rest_at_once():
    from core.config import DeploymentOptions, ModelDeployment

    limits = ModelDeployment(placement="inline",
                             engine=DeploymentOptions(max_ongoing_requests=2, max_queued_requests=2))
    router = asyncio.run(local_router(local_pipeline(model("echo", deployment=limits))))
    app = create_app(router, ServerConfig(retry_after_s={"overloaded": 3}))

    async def burst():
        import httpx
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post("/v1/infer", json=slow(0.3)) for _ in range(10)))
            return [(r.status_code, r.headers.get("retry-after")) for r in rs]

    results = asyncio.run(burst())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) == 4 and len(refused) == 6  # 2 running + 2 queued
    assert all(retry == "3" for _, retry in refused)  # the server's policy for this cause


def nested(depth: int):
    value: object = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return value


def test_nesting_and_string_limits_are_422_naming_the_place():
    app = app_with(max_json_depth=8, max_string_chars=100)
    assert call(app, "POST", "/v1/infer", json={"model_id": "echo", "input": nested(8)}).status_code == 200
    err = error_of(call(app, "POST", "/v1/infer", json={"model_id": "echo", "input": nested(9)}), 422)
    assert "deeper than 8 levels" in err["message"] and err["field"].startswith("input.0.0")
    err = error_of(call(app, "POST", "/v1/infer", json={"model_id": "echo", "input": {"a": "x" * 101}}), 422)
    assert err["field"] == "input.a" and "101 characters" in err["message"]
    err = error_of(call(app, "POST", "/v1/infer", json={
        "model_id": "echo", "messages": [{"role": "user", "content": "y" * 101}]}), 422)
    assert err["field"] == "messages.0.content"
    err = error_of(call(app, "POST", "/v1/chat/completions", json={
        "model": "echo", "messages": [{"role": "user", "content": "y" * 101}]}), 422)
    assert err["field"] == "messages.0.content"


def test_pathologically_deep_json_is_a_client_error_not_a_crash():
    app = app_with()
    body = '{"model_id": "echo", "input": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = call(app, "POST", "/v1/infer", content=body.encode(), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert call(app, "POST", "/v1/infer", json={"model_id": "echo", "input": 1}).status_code == 200
