"""The echo pipeline on a real Ray Serve, over real HTTP, in all three placements."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

# inline (every node in the ingress), engine (one hop), split (a deployment per node)
OVERRIDES = ["model=[echo,echo_remote,echo_split]", "server.max_body_bytes=4096"]
MODELS = ["echo", "echo-remote", "echo-split"]


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app, timeout=30) as client:
        yield client


@pytest.mark.parametrize("model_id", MODELS)
def test_infer_through_every_placement(http, model_id):
    r = http.post("/v1/infer", json={"model_id": model_id, "input": {"text": "hi", "n": [1, 2]}})
    assert r.status_code == 200, r.text
    assert r.json() == {"model_id": model_id, "output": {"text": "hi", "n": [1, 2]}, "finish_reason": "stop"}
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("model_id", MODELS)
def test_params_reach_the_engine_across_hops(http, model_id):
    r = http.post("/v1/infer", json={"model_id": model_id, "prompt": "slow", "params": {"delay_s": 0.2}})
    assert r.status_code == 200 and r.elapsed.total_seconds() >= 0.2


def test_errors_over_http(http):
    r = http.post("/v1/infer", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "bad_request"
    r = http.post("/v1/infer", json={"model_id": "ghost", "input": 1})
    assert r.status_code == 404 and r.json()["error"]["model_id"] == "ghost"
    r = http.post("/v1/infer", json={"model_id": "echo-split", "input": 1, "params": {"delay_s": "x"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "params.delay_s"
    r = http.post("/v1/infer", json={"model_id": "echo", "input": "x" * 5000})
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
    # and the replicas still serve
    assert http.post("/v1/infer", json={"model_id": "echo-remote", "input": 1}).status_code == 200


def test_models_and_status(http):
    data = http.get("/v1/models").json()["data"]
    assert {m["id"]: m["status"] for m in data} == dict.fromkeys(MODELS, "ready")
    assert {m["id"]: m["deployment"]["placement"] for m in data} == {
        "echo": "inline", "echo-remote": "engine", "echo-split": "split"}
    one = http.get("/v1/models/echo-remote").json()
    assert one["engine"] == "echo" and one["engine_kwargs"] == {"delay_s": 0.0}
    assert http.get("/v1/models/ghost").status_code == 404


def test_health_ready_docs(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json()["status"] == "ready"
    assert http.get("/docs").status_code == 200
    assert "/v1/infer" in http.get("/openapi.json").json()["paths"]


def test_deployments_match_the_placement(serve_app):
    from ray import serve

    app = serve.status().applications["mmserve"]
    assert set(app.deployments) == {"ingress", "echo-remote.engine", "echo-split.engine",
                                    "echo-split.preprocess", "echo-split.postprocess"}
