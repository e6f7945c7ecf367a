"""A request's life in one place (``api.call.Call``), no Ray: a route written with the one
dependency gets drain accounting, metrics and error rendering without asking for them, every
route of the app takes it, and no other module keeps a request's bookkeeping."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter

from api.app import create_app
from api.call import CallDep, _guarded
from core import metrics
from core.config import ServerConfig
from core.errors import InvalidField
from tests.support import ScriptedOpenAIEngine, local_pipeline, local_router, model

ROOT = Path(__file__).resolve().parents[2]
PROBE = "/v1/probe"


@pytest.fixture
def recording():
    metrics.configure(True)
    yield
    metrics.configure(False)
    # The registry is the process's: take the probe route's series out again, so that other
    # tests find only the app's own routes among the labels.
    for metric, values in [key for key in metrics._series if PROBE in key[1]]:
        metric.remove(*values)
        del metrics._series[(metric, values)]


def probe_app(closed: list, held: list):
    """The app of one echo model, with a route added the way a new route would be written:
    it takes the call, and does nothing about draining, metrics or errors."""
    router = asyncio.run(local_router(local_pipeline(model("echo", params={"delay_s": 0})),
                                      local_pipeline(model("chat"), ScriptedOpenAIEngine)))
    app = create_app(router, ServerConfig())
    probe = APIRouter()

    @probe.post(PROBE)
    async def probe_route(call: CallDep):
        body = await call.request.json()
        pipeline = call.pipeline(body["model"])
        ctx = call.context(body["model"], body.get("timeout_s"), "timeout_s")
        held.append(pipeline.in_flight)
        if "refuse" in body:
            raise InvalidField(f"{body['refuse']}: refused", model_id=ctx.model_id, field=body["refuse"])
        if "crash" in body:
            raise RuntimeError("a bug in the route")

        async def ticks():
            try:
                for i in range(body.get("events", 3)):
                    yield {"n": i}
                    await asyncio.sleep(body.get("delay_s", 0))
            finally:
                closed.append(True)

        return call.sse(ticks(), ctx) if body.get("stream") else call.json({"model": ctx.model_id})

    app.include_router(probe)
    return app, router.get("echo")


async def _post(app, path: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.post(path, json=body)


async def _scrape(app) -> list:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        from tests.support import metric_families

        return metric_families(await c.get("/metrics"))


async def _leave_mid_stream(app, path: str, body: dict) -> list[bytes]:
    """POST ``body`` as raw ASGI and go away once the first event has come; what was sent."""
    raw = json.dumps(body).encode()
    pending = [{"type": "http.request", "body": raw, "more_body": False}]
    gone = asyncio.Event()
    events: list[bytes] = []

    async def receive():
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            events.append(message["body"])
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    await asyncio.wait_for(app(scope, receive, send), 5)
    return events


def test_a_new_route_gets_drain_accounting_metrics_and_error_rendering(recording):
    closed, held = [], []
    app, echo = probe_app(closed, held)
    series = dict(model_id="echo", route=PROBE)

    async def scenario():
        before = await _scrape(app)
        answers = {
            "ok": await _post(app, PROBE, {"model": "echo"}),
            "stream": await _post(app, PROBE, {"model": "echo", "stream": True}),
            "refused": await _post(app, PROBE, {"model": "echo", "refuse": "temperature"}),
            "crash": await _post(app, PROBE, {"model": "echo", "crash": True}),
            "late": await _post(app, PROBE, {"model": "echo", "stream": True, "delay_s": 1, "timeout_s": 0.05}),
            "unknown": await _post(app, PROBE, {"model": "nope"}),
        }
        left = await _leave_mid_stream(app, PROBE, {"model": "echo", "stream": True, "events": 50, "delay_s": 0.02})
        return before, answers, left, await _scrape(app)

    before, answers, left, after = asyncio.run(scenario())

    def delta(sample, **labels):
        return metrics.sample_value(after, sample, **labels) - metrics.sample_value(before, sample, **labels)

    # drain accounting: each request held the pipeline while it ran, and let it go at the end,
    # a stream's end, a deadline, an error, a bug and a client gone away included
    assert held == [1] * 6 and echo.in_flight == 0 and echo._idle.is_set()
    assert len(closed) == 3  # every stream closed: ended, cut by its deadline, left by its client
    assert metrics.sample_value(after, "mmserve_requests_in_flight", **series) == 0

    # responses and errors as every route renders them
    ok, stream, refused, crash, late, unknown = answers.values()
    assert ok.json() == {"model": "echo"} and ok.headers["x-request-id"]
    assert stream.text.endswith("data: [DONE]\n\n") and '{"n": 2}' in stream.text
    assert refused.status_code == 422 and refused.json()["error"] == {
        "type": "invalid_request", "message": "temperature: refused", "model_id": "echo",
        "field": "temperature", "param": "temperature", "code": 422}
    err = crash.json()["error"]
    assert crash.status_code == 500 and err["type"] == "internal_error"
    assert crash.headers["x-request-id"] in err["message"]
    assert late.status_code == 200 and '"deadline_exceeded"' in late.text
    assert unknown.status_code == 404 and "served: chat, echo" in unknown.json()["error"]["message"]
    assert left and b"[DONE]" not in b"".join(left)

    # metrics labelled by the model the route named, with the error's type
    assert delta("mmserve_requests_total", code="200", error="", **series) == 2
    assert delta("mmserve_requests_total", code="422", error="invalid_request", **series) == 1
    assert delta("mmserve_requests_total", code="500", error="internal_error", **series) == 1
    assert delta("mmserve_requests_total", code="200", error="deadline_exceeded", **series) == 1
    assert delta("mmserve_requests_total", code="200", error="client_disconnected", **series) == 1
    assert delta("mmserve_requests_total", model_id="", route=PROBE, code="404", error="model_not_found") == 1
    assert delta("mmserve_client_disconnects_total", **series) == 1
    assert delta("mmserve_time_to_first_token_seconds_count", **series) == 3


@pytest.mark.parametrize("path, body", [
    ("/v1/infer", {"model_id": "echo", "input": "hi", "stream": True, "params": {"delay_s": 0.5}}),
    ("/v1/chat/completions", {"model": "chat", "messages": [], "stream": True, "events": 50, "delay_s": 0.02}),
])
def test_a_client_leaving_a_served_stream_lets_the_pipeline_go(path, body):
    app, _ = probe_app([], [])
    pipeline = app.state.router.get(body.get("model_id") or body["model"])
    first = []

    async def scenario():
        if path == "/v1/infer":  # echo answers once, after its delay: leave while it waits
            task = asyncio.create_task(_post(app, path, body))
            while pipeline.in_flight == 0:
                await asyncio.sleep(0.005)
            first.append(pipeline.in_flight)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            await _leave_mid_stream(app, path, body)
            first.append(1)

    asyncio.run(scenario())
    assert first == [1] and pipeline.in_flight == 0


def test_every_route_takes_the_call():
    """A route without the call would have no drain accounting, metrics or 500 rendering."""
    router = asyncio.run(local_router(local_pipeline(model("echo"))))
    app = create_app(router, ServerConfig())

    def takes_call(dependant) -> bool:
        return any(d.call is _guarded or takes_call(d) for d in dependant.dependencies)

    api_routes = [r for r in app.routes if hasattr(r, "dependant")]
    assert len(api_routes) > 10
    assert [r.path for r in api_routes if not takes_call(r.dependant)] == []


#: the modules that may touch a request's ASGI ``state``, and what each keeps there
STATE_KEEPERS = {
    "api/call.py": "reads the request id; holds the pipeline; reaches the metrics record",
    "api/middleware.py": "sets the request id, which every response carries (a 404's too)",
    "api/metrics.py": "sets the metrics record, which every response is counted by",
}


def _touches_state(node: ast.AST) -> bool:
    """``request.state`` (not ``app.state``), or a ``"state"`` key of the ASGI scope."""
    if isinstance(node, ast.Attribute) and node.attr == "state":
        owner = node.value
        return not ((isinstance(owner, ast.Name) and owner.id == "app")
                    or (isinstance(owner, ast.Attribute) and owner.attr == "app"))
    if isinstance(node, ast.Constant) and node.value == "state":
        return True
    return False


def test_only_the_call_keeps_a_requests_bookkeeping():
    """No module of ``api/`` but those of STATE_KEEPERS touches a request's state, and only
    ``api/call.py`` holds a pipeline (``enter``/``leave``) or labels the metrics by model."""
    offenders = []
    for path in sorted((ROOT / "api").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            line = f"{rel}:{getattr(node, 'lineno', '?')}"
            if _touches_state(node) and rel not in STATE_KEEPERS:
                offenders.append(f"{line} touches the request's state")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("enter", "leave", "for_model") and rel != "api/call.py"):
                offenders.append(f"{line} calls {node.func.attr}()")
            if (rel.startswith("api/routes/") and isinstance(node, ast.Attribute) and node.attr == "get"
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "router"):
                offenders.append(f"{line} finds a pipeline past call.pipeline()")
    assert offenders == []


def test_the_source_check_sees_a_route_that_keeps_its_own_bookkeeping():
    bad = ast.parse("async def route(request):\n"
                    "    request.state.pipeline = request.app.state.router.get('m')\n")
    assert [n for n in ast.walk(bad) if _touches_state(n)]
    good = ast.parse("async def route(call):\n    x = call.request.app.state.started\n")
    assert not [n for n in ast.walk(good) if _touches_state(n)]
