"""Request metrics in-process (no Ray): exact counts by model, route, status and error type,
label values that never come from what a client sent, and the merge of several processes'."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from core import metrics
from core.config import ServerConfig
from tests.support import local_pipeline, local_router, metric_families, model


@pytest.fixture
def recording():
    metrics.configure(True)
    yield
    metrics.configure(False)


def app_of(**server):
    router = asyncio.run(local_router(local_pipeline(model("echo", params={"delay_s": 0}))))
    return create_app(router, ServerConfig(**server))


async def _send(app, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return [await c.request(method, url, **kw) for method, url, kw in requests]


def send(app, *requests) -> list[httpx.Response]:
    return asyncio.run(_send(app, list(requests)))


def scrape(app, **headers) -> list:
    (r,) = send(app, ("GET", "/metrics", {"headers": headers}))
    families = metric_families(r)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return families


def value(families, sample, **labels) -> float:
    return metrics.sample_value(families, sample, **labels)


def infer(body: dict) -> tuple[str, str, dict]:
    return ("POST", "/v1/infer", {"json": body})


def test_a_known_mix_is_counted_exactly_by_model_status_and_error(recording):
    app = app_of()
    before = scrape(app)
    ok = infer({"model_id": "echo", "input": "hi"})
    streamed = infer({"model_id": "echo", "input": "hi", "stream": True})
    bad = infer({"model_id": "echo", "input": "hi", "params": {"nope": 1}})
    unknown = infer({"model_id": "not-served", "input": "hi"})
    late = infer({"model_id": "echo", "input": "hi", "params": {"delay_s": 1, "timeout_s": 0.05}})
    answers = send(app, ok, ok, ok, streamed, streamed, bad, bad, unknown, unknown, unknown, late)
    assert [r.status_code for r in answers] == [200] * 5 + [422] * 2 + [404] * 3 + [504]
    after = scrape(app)

    def delta(sample, **labels):
        return value(after, sample, **labels) - value(before, sample, **labels)

    route = {"route": "/v1/infer"}
    assert delta("mmserve_requests_total", model_id="echo", code="200", error="", **route) == 5
    assert delta("mmserve_requests_total", model_id="echo", code="422", error="invalid_request", **route) == 2
    assert delta("mmserve_requests_total", model_id="", code="404", error="model_not_found", **route) == 3
    assert delta("mmserve_requests_total", model_id="echo", code="504", error="deadline_exceeded", **route) == 1
    # every request timed once; time to first token for the two streams only
    assert delta("mmserve_request_duration_seconds_count", model_id="echo", **route) == 8
    assert delta("mmserve_request_duration_seconds_count", model_id="", **route) == 3
    assert delta("mmserve_time_to_first_token_seconds_count", model_id="echo", **route) == 2
    # the steps of the pipeline, as the ingress sees them: the 5 answered and the late one
    # preprocessed (the 422s fail before), 5 through the engine (the late one is cut there)
    assert delta("mmserve_node_duration_seconds_count", model_id="echo", node="preprocess") == 6
    assert delta("mmserve_node_duration_seconds_count", model_id="echo", node="engine") == 6
    assert delta("mmserve_node_duration_seconds_count", model_id="echo", node="postprocess") == 5
    assert value(after, "mmserve_requests_in_flight", model_id="echo") == 0
    assert value(after, "mmserve_model_status", model_id="echo", status="ready") == 1
    assert value(after, "mmserve_model_status", model_id="echo", status="starting") == 0


def test_labels_never_take_what_a_client_sent(recording):
    app = app_of()
    send(app, *(infer({"model_id": f"made-up-{i}", "input": 1}) for i in range(5)),
         *(("GET", f"/no/such/path/{i}", {}) for i in range(5)),
         ("GET", "/v1/models/made-up", {}), ("GET", "/v1/models/echo", {}))
    families = scrape(app)
    # (the registry is this process's: other tests' models and routes are in it too)
    labels = [s.labels for f in families if f.name == "mmserve_requests" for s in f.samples]
    assert not [lab for lab in labels if "made-up" in lab["model_id"] or "/no/such" in lab["route"]]
    assert {lab["route"] for lab in labels} <= {r.path for r in app.routes} | {"other"}
    assert value(families, "mmserve_requests_total", route="other", code="404", error="not_found") >= 5
    assert value(families, "mmserve_requests_total", route="/v1/models/{model_id:path}", model_id="echo") >= 1


def test_refusals_before_a_route_are_counted(recording):
    app = app_of(api_keys=["k"])
    before = scrape(app, authorization="Bearer k")
    r, = send(app, infer({"model_id": "echo", "input": 1}))
    assert r.status_code == 401
    after = scrape(app, authorization="Bearer k")
    labels = dict(route="/v1/infer", code="401", error="unauthorized")
    assert value(after, "mmserve_requests_total", **labels) - value(before, "mmserve_requests_total", **labels) == 1


def test_metrics_need_a_key_unless_public():
    (r,) = send(app_of(api_keys=["k"]), ("GET", "/metrics", {}))
    assert r.status_code == 401
    (r,) = send(app_of(api_keys=["k"], metrics_public=True), ("GET", "/metrics", {}))
    assert r.status_code == 200 and "mmserve_requests_total" in r.text


def test_metrics_off_is_404_and_counts_nothing():
    app = app_of(metrics=False)
    (r,) = send(app, ("GET", "/metrics", {}))
    assert r.status_code == 404 and "server.metrics" in r.json()["error"]["message"]


def test_merge_labels_each_process_and_keeps_a_samples_own_label():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    texts = []
    for replica in ("a", "b"):
        reg = CollectorRegistry()
        Gauge("vllm:num_requests_running", "running", ["model_name"], registry=reg).labels("m").set(2)
        Counter("mmserve_requests", "requests", ["model_id"], registry=reg).labels("own").inc(3)
        texts.append(generate_latest(reg).decode())
    merged = metrics.merge([({"replica": r, "model_id": "m"}, metrics.parse(t)) for r, t in zip("ab", texts)])
    families = list(text_string_to_metric_families(metrics.render(merged).decode()))
    running = [s for f in families for s in f.samples if s.name == "vllm:num_requests_running"]
    assert sorted((s.labels["replica"], s.labels["model_id"], s.value) for s in running) == \
        [("a", "m", 2.0), ("b", "m", 2.0)]
    assert value(families, "mmserve_requests_total", model_id="own") == 6  # the sample's own model_id
    assert value(families, "mmserve_requests_total", model_id="m") == 0


def test_vllms_samples_from_a_process_of_several_models_take_model_id_from_model_name():
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()  # the ingress: no model_id of its own, AsyncLLMs of remote_core models
    g = Gauge("vllm:num_requests_running", "running", ["model_name"], registry=reg)
    g.labels("llama").set(1)
    g.labels("qwen").set(3)
    merged = metrics.merge([({"deployment": "ingress"}, metrics.parse(generate_latest(reg).decode()))])
    assert value(merged, "vllm:num_requests_running", model_id="qwen", deployment="ingress") == 3
    assert value(merged, "vllm:num_requests_running", model_id="llama") == 1


def test_status_family_has_one_current_status_per_model():
    family = metrics.status_family({"a": "ready", "b": "unhealthy: engine dead"})
    current = {(s.labels["model_id"], s.labels["status"]) for s in family.samples if s.value == 1}
    assert current == {("a", "ready"), ("b", "unhealthy")}
    assert len(family.samples) == 2 * len(metrics.STATUSES)


def test_time_per_output_token_is_the_time_between_first_and_last_per_token_after_the_first(recording):
    before = value(list(metrics.REGISTRY.collect()), "mmserve_time_per_output_token_seconds_count", model_id="t")
    timer = metrics.TokenTimer()
    timer.add(1)
    timer.first -= 0.3  # as if the first token came 0.3 s before the rest
    timer.add(3)
    timer.observe("t")
    families = list(metrics.REGISTRY.collect())
    assert value(families, "mmserve_time_per_output_token_seconds_count", model_id="t") - before == 1
    assert 0.1 <= value(families, "mmserve_time_per_output_token_seconds_sum", model_id="t") < 0.2


def test_the_directory_lists_an_applications_model_step_applications_with_it():
    """Each model step is a Serve application of its own (``<app>.<model_id>.<step>``): the
    ingress's scrape covers them, and not another application's."""
    from core.metrics import Directory

    d = Directory()
    d.register("mmserve", "i", "http://a", {"deployment": "ingress"})
    d.register("mmserve.m.engine", "e", "http://b", {"deployment": "m.engine", "model_id": "m"})
    d.register("mmserve2", "x", "http://c", {"deployment": "ingress"})
    procs, starts = d.listing("mmserve")
    assert sorted(k for k, _, _ in procs) == ["e", "i"]
    assert sorted(starts) == [("", "ingress", 1), ("m", "m.engine", 1)]
    d.unregister("mmserve", "e")
    assert [k for k, _, _ in d.listing("mmserve")[0]] == ["i"]
    assert [k for k, _, _ in d.listing("mmserve2")[0]] == ["x"]
