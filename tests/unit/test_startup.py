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
from core.internals import ApplicationState, DeploymentState
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


def test_slow_models_start_after_the_quick_ones_in_turns():
    """``server.slow_starts_at_once``: a model whose engine starts slowly waits until the quick
    ones are up, then the slow ones start in the config's order, that many at a time; one
    whose engine is deployed elsewhere says so (``waiting_turn``) until its turn, one that
    fails to start frees its turn."""
    async def go():
        gates = {m: asyncio.Event() for m in ("quick", "slow1", "slow2")}
        started: list[str] = []

        class Gated(EchoEngine):
            async def start(self) -> None:
                started.append(self.model.model_id)
                await gates[self.model.model_id].wait()
                if self.model.model_id == "slow2":
                    raise RuntimeError("out of memory")

        pipelines = {m: local_pipeline(model(m), Gated) for m in ("quick", "slow1", "slow2")}
        pipelines["slow3"] = local_pipeline(model("slow3"))
        for m, p in pipelines.items():
            p.spec = SimpleNamespace(remote_steps=("engine",) if m == "slow3" else ())
            p.slow_start = m.startswith("slow")

        async def follow(ps):  # the launcher deploys slow3's engine once its turn came
            slow3 = pipelines["slow3"]
            await _until(lambda: slow3.turn is None, timeout_s=10)
            slow3.waiting("engine", None)

        router = ModelRouter([])
        router.begin(list(pipelines.values()), lambda p: p, follow, slow_at_once=1)
        states = router.states
        settled = asyncio.create_task(router.settled())  # what a replica joining others awaits
        await _until(lambda: started == ["quick"])
        assert {m: s["waiting_turn"] for m, s in states().items()} == {
            "quick": False, "slow1": True, "slow2": True, "slow3": True}
        assert states()["slow1"]["detail"] == "waiting to start, after the models that start quickly"
        gates["quick"].set()
        await _until(lambda: started == ["quick", "slow1"])
        assert states()["slow1"] == {"state": "starting", "detail": "starting in the ingress",
                                     "ready_after_s": None, "waiting_turn": False}
        assert states()["slow2"]["detail"] == states()["slow3"]["detail"] == "waiting to start, after slow1"
        gates["slow1"].set()
        await _until(lambda: started == ["quick", "slow1", "slow2"] and pipelines["slow1"].state == "ready")
        assert states()["slow3"]["waiting_turn"] and states()["slow3"]["detail"] == "waiting to start, after slow2"
        assert not settled.done()
        gates["slow2"].set()  # it fails: slow3's turn comes all the same
        await _until(lambda: pipelines["slow3"].state == "ready")
        assert {m: s["state"] for m, s in states().items()} == {
            "quick": "ready", "slow1": "ready", "slow2": "failed", "slow3": "ready"}
        assert states()["slow2"]["detail"] == "RuntimeError: out of memory"
        await asyncio.wait_for(settled, 5)  # every model ready or failed

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
    starting = ApplicationState("DEPLOYING", "", {"d": DeploymentState("UPDATING", "", {"STARTING": 1})})
    statuses = iter([
        {},
        {"app.remote.engine": starting, "app.echo.engine": starting},
        {"app.remote.engine": ApplicationState("RUNNING", "", {}),
         "app.echo.engine": ApplicationState("DEPLOY_FAILED", "Failed to update the deployments ['d'].", {
             "d": DeploymentState("DEPLOY_FAILED", (
                 "The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
                 "  File \"x.py\", line 1\nOSError: no file named model.safetensors\n"), {})})},
    ])
    seen = []

    def status():
        seen.append((up.state_detail, down.state_detail))
        return next(statuses)

    monkeypatch.setattr(deployments.internals, "serve_applications", status)
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


def test_the_warnings_a_user_should_act_on_are_found_in_rays_logs_and_told_once(tmp_path):
    import logging

    from apps.config import compose
    from apps.launch import engine_advice, quiet_serve_driver
    from apps.log_advice import advice

    (tmp_path / "serve").mkdir()
    worker = "(pid=1) libtcmalloc is not found in LD_PRELOAD. For best performance, please follow ...\n"
    (tmp_path / "worker-a-01-1.err").write_text(worker)
    (tmp_path / "worker-b-01-2.err").write_text(worker * 3)
    (tmp_path / "serve" / "replica_x.log").write_text("INFO all well\n")
    (tmp_path / "events.bin").write_text("1 worker(s) were killed due to the node running low on memory.")
    assert advice(str(tmp_path)) == []  # the only line of Ray's own is in a file that is no log
    (tmp_path / "raylet.out").write_text("1 worker(s) were killed due to the node running low on memory.")
    lines = advice(str(tmp_path), engine_advice(compose()))
    assert len(lines) == 2 and lines[0].startswith("Ray killed workers, the machine being short of memory")
    assert "LD_PRELOAD=" in lines[1] and "tcmalloc" in lines[1]
    assert engine_advice(compose(["model=[echo]", "pipeline=[echo]"])) == []

    quiet_serve_driver()  # the ingress's slow answer to the launcher's queue-length probe is not news
    record = logging.LogRecord("ray.serve", logging.WARNING, "x", 1, "Failed to get queue length from R within 0.1s.",
                               None, None)
    serve_logger = logging.getLogger("ray.serve")
    assert not serve_logger.filter(record)
    record.msg = "Deployment 'd' has 1 replicas that have taken more than 30s to be scheduled."
    assert serve_logger.filter(record)
