"""A starting ingress answers at once and each model takes requests once it is up
(``ModelRouter.begin``), in-process over scripted engines: one that starts at once, one whose
start waits, one with a step in a deployment of its own, one that cannot start. The same with Ray
and the embedded default runs in tests/integration/test_first_minute.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx

from api.app import create_app
from core.config import ServerConfig
from core.errors import NotReady
from engines.echo import EchoEngine
from pipelines import deployments
from pipelines.router import ModelRouter
from tests.support import local_pipeline, model


class GatedEngine(EchoEngine):
    """Starts when the test opens its gate."""

    gate: asyncio.Event

    async def start(self) -> None:
        await self.gate.wait()


class BrokenEngine(EchoEngine):
    """Cannot start: its weights are missing."""

    async def start(self) -> None:
        raise RuntimeError("no weights at /nowhere")


def _pipelines():
    pipelines = {"echo": local_pipeline(model("echo")), "gated": local_pipeline(model("gated"), GatedEngine),
                 "remote": local_pipeline(model("remote")), "broken": local_pipeline(model("broken"), BrokenEngine)}
    for p in pipelines.values():
        p.spec = SimpleNamespace(remote_steps=("engine",) if p.model.model_id == "remote" else ())
    return pipelines


async def _until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_the_ingress_answers_while_models_start_and_each_serves_once_it_is_up():
    async def go():
        GatedEngine.gate = asyncio.Event()
        deployed = asyncio.Event()
        pipelines = _pipelines()

        async def follow(ps):  # what follow_deployments tells of the remote step
            remote = next(p for p in ps if p.model.model_id == "remote")
            remote.waiting("engine", "1 replica starting")
            await deployed.wait()
            remote.waiting("engine", None)

        router = ModelRouter([])
        router.begin(list(pipelines.values()), lambda p: p, follow)
        app = create_app(router, ServerConfig())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            async def infer(model_id):
                return await c.post("/v1/infer", json={"model_id": model_id, "input": "hi"})

            assert (await c.get("/health")).status_code == 200
            await _until(lambda: pipelines["broken"].state == "failed" and pipelines["echo"].state == "ready")
            listed = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
            assert {m: e["status"] for m, e in listed.items()} == {
                "echo": "ready", "gated": "starting", "remote": "starting", "broken": "failed"}
            assert listed["gated"]["status_detail"] == "starting in the ingress"
            assert listed["remote"]["status_detail"] == "engine: 1 replica starting"
            assert listed["broken"]["status_detail"] == "RuntimeError: no weights at /nowhere"
            assert listed["echo"]["ready_after_s"] is not None and listed["gated"]["ready_after_s"] is None
            assert (await c.get("/v1/models/gated")).json()["status"] == "starting"

            assert (await infer("echo")).json()["output"] == "hi"
            starting = await infer("gated")
            assert starting.status_code == 503 and starting.headers["retry-after"] == "5"
            error = starting.json()["error"]
            assert error["type"] == "not_ready" and "'gated' is starting (starting in the ingress" in error["message"]
            assert "'remote' is starting (engine: 1 replica starting" in (await infer("remote")).json()["error"]["message"]
            broken = await infer("broken")
            assert broken.status_code == 503 and "retry-after" not in broken.headers
            assert broken.json()["error"]["message"] == \
                "model 'broken' failed to start: RuntimeError: no weights at /nowhere"

            ready = await c.get("/ready")
            assert ready.status_code == 503
            assert set(ready.json()["error"]["models"]) == {"gated", "remote", "broken"}

            GatedEngine.gate.set()
            await _until(lambda: pipelines["gated"].state == "ready")
            assert (await infer("gated")).json()["output"] == "hi"
            assert (await infer("remote")).status_code == 503
            deployed.set()
            await _until(lambda: pipelines["remote"].state == "ready")
            assert (await infer("remote")).json()["output"] == "hi"
            assert router.states()["remote"]["ready_after_s"] >= router.states()["echo"]["ready_after_s"]

    asyncio.run(go())


def test_followed_deployments_tell_what_serve_does_and_why_one_failed(monkeypatch):
    """``follow_deployments`` reads Serve's status of each remote step's application: absent
    (not deployed yet), replicas starting, running (the step is up), failed (the last line of
    Serve's message, the constructor's error, is the model's failure)."""
    pipelines = _pipelines()
    up, down = pipelines["remote"], pipelines["echo"]
    down.spec = SimpleNamespace(remote_steps=("engine",))
    for p in (up, down):
        p.waiting("engine", "deploying")
        p.started = True
    starting = SimpleNamespace(status="ApplicationStatus.DEPLOYING", message="", deployments={
        "d": SimpleNamespace(replica_states={"ReplicaState.STARTING": 1}, message="")})
    statuses = iter([
        {},
        {"app.remote.engine": starting, "app.echo.engine": starting},
        {"app.remote.engine": SimpleNamespace(status="ApplicationStatus.RUNNING", message="", deployments={}),
         "app.echo.engine": SimpleNamespace(
             status="ApplicationStatus.DEPLOY_FAILED", message="Failed to update the deployments ['d'].",
             deployments={"d": SimpleNamespace(replica_states={}, message=(
                 "The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
                 "  File \"x.py\", line 1\nOSError: no file named model.safetensors\n"))})},
    ])
    seen = []

    def status():
        seen.append((up.state_detail, down.state_detail))
        return SimpleNamespace(applications=next(statuses))

    monkeypatch.setattr(deployments.serve, "status", status)
    asyncio.run(deployments.follow_deployments("app", [up, down], period_s=0.0))
    assert seen == [("engine: deploying", "engine: deploying")] * 2 + [
        ("engine: 1 replica starting", "engine: 1 replica starting")]
    assert up.state == "ready" and up.ready_after_s is not None
    assert down.state == "failed" and down.failure == "engine: OSError: no file named model.safetensors"


def test_a_model_that_is_not_ready_refuses_naming_its_state():
    p = local_pipeline(model("m"))
    p.waiting("engine", "2 replicas starting")
    try:
        p.check_serving()
    except NotReady as err:
        assert err.retry == "starting" and "engine: 2 replicas starting; starting in the ingress" in str(err)
    else:
        raise AssertionError("a starting model served")
    p.fail("engine: OSError: gone")
    try:
        p.check_serving()
    except NotReady as err:
        assert err.retry is None and str(err) == "model 'm' failed to start: engine: OSError: gone"
    else:
        raise AssertionError("a failed model served")


def test_the_launchers_table_shows_each_models_state_and_what_it_waits_for():
    import io

    from rich.console import Console

    from apps.config import compose
    from apps.progress import StartupTable, first_call

    cfg = compose(["model=[echo,tiny_resnet]", "pipeline=[echo,vision]"])
    out = io.StringIO()
    table = StartupTable(cfg, Console(file=out, width=160))
    table.start()
    table({"echo": {"state": "ready", "detail": "", "ready_after_s": 0.2},
           "tiny-resnet": {"state": "starting", "detail": "engine: 1 replica starting", "ready_after_s": None}})
    table({"echo": {"state": "ready", "detail": "", "ready_after_s": 0.2},
           "tiny-resnet": {"state": "failed", "detail": "engine: OSError: gone", "ready_after_s": None}})
    table.stop()
    table.stop()  # again: nothing
    last = out.getvalue().split("models")[-1]
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in last.splitlines() if line.startswith("│")}
    assert rows["echo"][:3] == ["text", "inline", "ready"]
    assert rows["tiny-resnet"][2] == "failed" and rows["tiny-resnet"][4] == "engine: OSError: gone"
    assert first_call(cfg, "http://h:1", {"echo"}).startswith("curl -s http://h:1/v1/infer")
    assert first_call(cfg, "http://h:1", {"tiny-resnet"}) == "curl -s http://h:1/v1/models/tiny-resnet"
    assert first_call(cfg, "http://h:1", set()) is None
