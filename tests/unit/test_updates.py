"""Changing the served models in place (no Ray): the router swaps its set of pipelines; a model
left out takes no new request, finishes those in flight, then stops; an unchanged one keeps its
pipeline; the HTTP API follows at once (404 naming the served ids, the OpenAPI schema)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from api.app import create_app
from apps.builder import route_specs
from apps.config import compose
from core.config import ServerConfig
from pipelines.deployments import pipeline_for
from pipelines.router import ModelRouter
from tests.support import inline_spec


def inline_specs() -> dict:
    """echo, echo-remote and echo-split, each with every step in this process."""
    cfg = compose(["model=[echo,echo_remote,echo_split]", "pipeline=[echo]"])
    return {s.model.model_id: inline_spec(s) for s in route_specs(cfg)}


def test_an_update_adds_keeps_and_drains_before_it_removes():
    specs = inline_specs()
    a, b, c = specs["echo"], specs["echo-split"], specs["echo-remote"]

    async def scenario():
        router = ModelRouter([])
        app = create_app(router, ServerConfig())
        await router.update([a, c], pipeline_for, drain_timeout_s=5)
        first_a, first_c = router.get("echo"), router.get("echo-remote")
        assert first_c.engine.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            slow = asyncio.create_task(client.post("/v1/infer", json={
                "model_id": "echo-remote", "input": "in flight", "params": {"delay_s": 0.5}}))
            while first_c.in_flight == 0:  # the request holds C's pipeline
                await asyncio.sleep(0.01)
            update = asyncio.create_task(router.update([a, b], pipeline_for, drain_timeout_s=5))
            while "echo-split" not in {p.model.model_id for p in router}:
                await asyncio.sleep(0.01)

            # C is gone for new requests at once, its request in flight is still running
            gone = await client.post("/v1/infer", json={"model_id": "echo-remote", "input": "late"})
            assert gone.status_code == 404
            assert "served: echo, echo-split" in gone.json()["error"]["message"]
            assert not update.done() and first_c.engine.started
            added = await client.post("/v1/infer", json={"model_id": "echo-split", "input": "new"})
            assert added.json()["output"] == "new"

            done = await slow
            assert done.status_code == 200 and done.json()["output"] == "in flight"
            await update
            assert first_c.in_flight == 0 and not first_c.engine.started  # drained, then stopped
            assert router.get("echo") is first_a  # unchanged: the same pipeline, never restarted
            ids = (await client.get("/openapi.json")).json()["components"]["schemas"]["InferRequest"][
                "properties"]["model_id"]["enum"]
            assert ids == ["echo", "echo-split"]

    asyncio.run(scenario())


def test_a_changed_model_gets_a_new_pipeline_and_the_old_one_drains():
    specs = inline_specs()
    a = specs["echo"]
    slower = a.model_copy(update={"model": a.model.model_copy(update={"params": {"delay_s": 0.01}})})

    async def scenario():
        router = ModelRouter([])
        await router.update([a], pipeline_for, drain_timeout_s=5)
        old = router.get("echo")
        await router.update([slower], pipeline_for, drain_timeout_s=5)
        assert router.get("echo") is not old and router.get("echo").model.params == {"delay_s": 0.01}
        assert not old.engine.started

    asyncio.run(scenario())


def test_adapters_loaded_into_a_model_stay_while_it_is_kept_and_go_with_it():
    from core.protocol import Adapter

    specs = inline_specs()
    a, c = specs["echo"], specs["echo-remote"]
    changed = a.model_copy(update={"model": a.model.model_copy(update={"params": {"delay_s": 0.01}})})

    async def scenario():
        router = ModelRouter([])
        await router.update([a, c], pipeline_for, drain_timeout_s=5)
        router.add_adapter(Adapter("sql", "/adapters/sql", "echo"))
        router.add_adapter(Adapter("chat", "/adapters/chat", "echo-remote"))
        await router.update([a], pipeline_for, drain_timeout_s=5)  # echo kept, echo-remote removed
        assert set(router.adapters) == {"sql"} and router.get("sql") is router.get("echo")
        await router.update([changed], pipeline_for, drain_timeout_s=5)  # echo changed: a new engine
        assert router.adapters == {}

    asyncio.run(scenario())


def test_a_pipeline_that_fails_to_start_leaves_the_served_set_as_it_was():
    specs = inline_specs()
    a, b, c = specs["echo"], specs["echo-split"], specs["echo-remote"]
    built = []

    def build(spec):
        p = pipeline_for(spec)
        built.append(p)
        if spec is b:
            async def fail():
                raise RuntimeError("no weights")
            p.start = fail
        return p

    async def scenario():
        router = ModelRouter([])
        await router.update([a], pipeline_for, drain_timeout_s=5)
        try:
            await router.update([a, c, b], build, drain_timeout_s=5)
        except RuntimeError as err:
            assert "no weights" in str(err)
        else:
            raise AssertionError("the update should fail")
        assert [p.model.model_id for p in router] == ["echo"]
        assert router.get("echo").engine.started
        # what the failed update started beside b (c's inline engine) is stopped again
        assert [p.model.model_id for p in built] == ["echo-remote", "echo-split"]
        assert not built[0].engine.started

    asyncio.run(scenario())


def test_an_update_whose_new_step_fails_deletes_what_it_started_and_leaves_the_ingress(monkeypatch):
    """``RaySession.update``'s order, with Serve's calls recorded: added steps first; if one
    fails, only what this update started is deleted and the ingress is not touched; otherwise the
    ingress next, and the removed model's steps last."""
    from apps import serving
    from core.validate import ConfigError

    old = compose(["model=[echo,echo_remote]", "pipeline=[echo]"])
    new = compose(["model=[echo_remote,echo_split]", "pipeline=[echo]"])
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(serving, "step_apps_of", lambda app: ["mmserve.echo-remote.engine"])
    monkeypatch.setattr(serving, "_delete", lambda names: calls.append(("delete", list(names))))
    monkeypatch.setattr(serving, "_ingress_update_error", lambda app: None)

    def failing_run(targets, timeout_s):
        calls.append(("run", [t.name for t in targets]))
        if any("echo-split" in t.name for t in targets):
            raise RuntimeError("application 'mmserve.echo-split.engine' failed to deploy")

    monkeypatch.setattr(serving, "_run", failing_run)
    session = serving.RaySession(server=old.server, started=False, handles_signals=False)
    with pytest.raises(RuntimeError, match="failed to deploy"):
        session.update(old, new, app_name="mmserve", route_prefix="/")
    split = [f"mmserve.echo-split.{s}" for s in ("preprocess", "engine", "postprocess")]
    assert calls == [("run", ["mmserve.echo-remote.engine", *split]), ("delete", split)]

    calls.clear()
    monkeypatch.setattr(serving, "_run", lambda targets, timeout_s: calls.append(("run", [t.name for t in targets])))
    old = compose(["model=[echo_remote,echo_split]", "pipeline=[echo]"])
    new = compose(["model=[echo_split]", "pipeline=[echo]"])
    changes = session.update(old, new, app_name="mmserve", route_prefix="/")
    assert changes == {"added": [], "removed": ["echo-remote"], "changed": []}
    assert calls == [("run", split), ("run", ["mmserve"]), ("delete", ["mmserve.echo-remote.engine"])]

    # the ingress could not start a new model's local steps: it kept the old ones, gets their
    # config back, and what the update started goes
    calls.clear()
    monkeypatch.setattr(serving, "_ingress_update_error", lambda app: "RuntimeError: no tokenizer")
    monkeypatch.setattr(serving, "step_apps_of", lambda app: ["mmserve.echo-remote.engine", *split])
    with pytest.raises(RuntimeError, match="no tokenizer.*still serves \\['echo-remote', 'echo-split'\\]"):
        session.update(old, compose(["model=[echo_split,echo]", "pipeline=[echo]"]), app_name="mmserve",
                       route_prefix="/")
    assert calls == [("run", split), ("run", ["mmserve"]), ("run", ["mmserve"]), ("delete", [])]
    monkeypatch.setattr(serving, "_ingress_update_error", lambda app: None)

    changed_server = compose(["model=[echo_split]", "pipeline=[echo]", "server.max_body_bytes=1000"])
    with pytest.raises(ConfigError) as err:
        session.update(new, changed_server, app_name="mmserve", route_prefix="/")
    assert [k for k, _ in err.value.problems] == ["server"]


@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited")  # Serve's ASGI wrapper
def test_the_ingress_keeps_its_models_when_a_later_set_fails_and_fails_on_a_first_one():
    """A model that cannot start must not take the HTTP entry of the others down: only a first
    set of models that cannot even be read fails the replica (one that reads starts in the
    background: tests/unit/test_startup.py)."""
    from api.ingress import Ingress

    specs = inline_specs()
    cls = Ingress.func_or_class
    ingress = cls.__new__(cls)
    ingress.server, ingress.router = ServerConfig(), ModelRouter([])
    ingress.configured, ingress.update_error = False, None
    ingress._pipeline = pipeline_for

    async def follow(pipelines):  # no remote steps here: nothing to follow
        assert not any(p.spec.remote_steps for p in pipelines)
    ingress._follow = follow
    good = {"routes": [specs["echo"].model_dump(mode="json")]}
    bad = {"routes": [*good["routes"], {"model": {"model_id": "x"}}]}  # not a RouteSpec

    async def scenario():
        with pytest.raises(Exception):
            await ingress.reconfigure(bad)
        await ingress.reconfigure(good)
        assert ingress.last_update_error() is None
        await asyncio.wait_for(_ready(ingress.router), 10)
        await ingress.reconfigure(bad)
        assert "ValidationError" in ingress.last_update_error()
        assert [p.model.model_id for p in ingress.router] == ["echo"]
        await ingress.reconfigure(good)
        assert ingress.last_update_error() is None

    asyncio.run(scenario())


async def _ready(router) -> None:
    """Until every model of ``router`` has started (a first set starts in the background)."""
    while any(p.state != "ready" for p in router):
        await asyncio.sleep(0.01)
