"""Adapters served under their own model ids, in-process (no Ray, no vLLM), over an engine that
takes them in a scripted protocol: the ingress's list of adapters, vLLM's load and unload routes
and their refusals, an adapter's id on every route and in the listing. The same with vLLM's
LoRA runs for real in tests/integration/vllm/test_lora.py."""

from __future__ import annotations

import asyncio

import pytest

from api.app import create_app
from core.config import ServerConfig
from tests.support import ScriptedAdapterEngine, local_pipeline, local_router, model
from tests.unit.test_ingress import call, error_of


def _app(*, runtime: bool = True, takers: tuple[str, ...] = ("base",)):
    router = asyncio.run(local_router(local_pipeline(model("echo")),
                                      *(local_pipeline(model(t), ScriptedAdapterEngine) for t in takers)))
    return create_app(router, ServerConfig(allow_runtime_lora_updating=runtime))


@pytest.fixture
def app():
    return _app()


def _load(app, **body):
    return call(app, "POST", "/v1/load_lora_adapter", json=body)


def test_a_configured_adapter_is_listed_under_its_own_id_with_its_base_as_parent(app):
    data = {m["id"]: m for m in call(app, "GET", "/v1/models").json()["data"]}
    assert data["base-static"]["parent"] == "base" and data["base-static"]["root"] == "/adapters/static"
    assert data["base-static"]["status"] == data["base"]["status"] == "ready"
    one = call(app, "GET", "/v1/models/base-static").json()
    assert one["id"] == "base-static" and one["parent"] == "base"


def test_an_adapters_id_reaches_its_base_models_engine_with_the_adapter_on_every_route(app):
    r = call(app, "POST", "/v1/completions", json={"model": "base-static", "prompt": "x"})
    assert r.json() == {"model": "base-static", "adapter": "/adapters/static", "base": "base"}
    r = call(app, "POST", "/v1/infer", json={"model_id": "base-static", "input": "x"})
    assert r.json()["model_id"] == "base-static" and r.json()["output"]["adapter"] == "base-static"
    r = call(app, "POST", "/v1/infer", json={"model_id": "base", "input": "x"})
    assert r.json()["output"]["adapter"] is None  # the base model, without the adapter


def test_requests_to_an_adapter_are_counted_under_its_own_id(app):
    call(app, "POST", "/v1/infer", json={"model_id": "base-static", "input": "x"})
    text = call(app, "GET", "/metrics").text
    assert 'model_id="base-static"' in text


def test_an_adapter_loaded_at_run_time_serves_until_unloaded(app):
    r = _load(app, lora_name="sql", lora_path="/adapters/sql")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' added successfully."
    assert r.headers["content-type"].startswith("text/plain")  # vLLM's answer, as vLLM gives it
    assert call(app, "GET", "/v1/models/sql").json()["parent"] == "base"
    r = call(app, "POST", "/v1/completions", json={"model": "sql", "prompt": "x"})
    assert r.json()["adapter"] == "/adapters/sql"
    r = call(app, "POST", "/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert r.status_code == 200 and "removed" in r.text
    err = error_of(call(app, "POST", "/v1/completions", json={"model": "sql", "prompt": "x"}), 404)
    assert "'sql'" in err["message"] and "base-static" in err["message"]  # the ids still served
    assert "sql" not in {m["id"] for m in call(app, "GET", "/v1/models").json()["data"]}


def test_load_refusals_name_what_was_wrong_and_change_nothing(app):
    err = error_of(_load(app, lora_name="bad", lora_path="/nowhere/bad"), 400)
    assert err["field"] == "lora_path" and "/nowhere/bad" in err["message"]
    assert error_of(call(app, "POST", "/v1/completions", json={"model": "bad", "prompt": "x"}), 404)
    assert error_of(_load(app, lora_name="x"), 400)["field"] == "lora_path"
    assert error_of(_load(app, lora_path="/adapters/x"), 400)["field"] == "lora_name"
    assert "conflicts" in error_of(_load(app, lora_name="echo", lora_path="/a"), 400)["message"]
    err = error_of(_load(app, lora_name="base-static", lora_path="/a"), 400)
    assert "load_inplace" in err["message"]  # vLLM's words
    assert _load(app, lora_name="base-static", lora_path="/a", load_inplace=True).status_code == 200
    assert call(app, "GET", "/v1/models/base-static").json()["root"] == "/a"


def test_unloading_an_unknown_adapter_is_404_naming_it(app):
    err = error_of(call(app, "POST", "/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404)
    assert "'nope'" in err["message"] and "base-static" in err["message"]


def test_the_base_model_is_named_where_several_take_adapters():
    app = _app(takers=("one", "two"))
    err = error_of(_load(app, lora_name="sql", lora_path="/a"), 400)
    assert err["field"] == "base_model_name" and "one, two" in err["message"]
    err = error_of(_load(app, lora_name="sql", lora_path="/a", base_model_name="echo"), 400)
    assert "echo" in err["message"]
    assert _load(app, lora_name="sql", lora_path="/a", base_model_name="two").status_code == 200
    assert call(app, "GET", "/v1/models/sql").json()["parent"] == "two"


def test_no_model_takes_adapters():
    err = error_of(_load(_app(takers=()), lora_name="sql", lora_path="/a"), 400)
    assert "enable_lora" in err["message"]


def test_runtime_loading_is_off_unless_the_server_allows_it():
    app = _app(runtime=False)
    err = error_of(_load(app, lora_name="sql", lora_path="/a"), 404)
    assert "server.allow_runtime_lora_updating" in err["message"]
    # the config's adapters serve all the same
    assert call(app, "POST", "/v1/completions", json={"model": "base-static", "prompt": "x"}).status_code == 200
