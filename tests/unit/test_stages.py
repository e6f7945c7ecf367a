"""The remote steps' wait for a replica, against a fake Serve handle (no Ray)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from core.errors import NotReady
from core.protocol import RequestContext
from core import internals
from pipelines.stages import ASSIGN_CHECK_S, RemoteEngine, RemoteNode


class FakeResponse:
    """A handle call whose assignment to a replica completes when ``assign`` is called."""

    def __init__(self) -> None:
        self.assignment = asyncio.get_running_loop().create_future()
        self.cancelled = False

    async def assigned(self):
        return await asyncio.shield(self.assignment)

    def assign(self, result) -> None:
        self.assignment.set_result(result)

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self):
        return self.assigned().__await__()


@pytest.fixture(autouse=True)
def fake_serve_router(monkeypatch):
    """What ``core.internals`` reads from Serve's router, as the fake handle says (the real
    objects are read by tests/integration/pipelines/test_echo_serve.py)."""
    monkeypatch.setattr(internals, "assignment", lambda response: response.assigned())
    monkeypatch.setattr(internals, "routable_replicas", lambda handle: handle.replicas)


def fake_handle(response: FakeResponse, replicas: int):
    async def down():
        raise ConnectionError("no replica")

    return SimpleNamespace(replicas=replicas, remote=lambda *args: response,
                           generate=SimpleNamespace(remote=lambda *args: response),
                           status=SimpleNamespace(remote=down))


def ctx() -> RequestContext:
    return RequestContext(request_id="r", model_id="m", deadline=None)


def test_a_call_left_without_a_replica_is_503_and_marks_the_model_recovering():
    async def scenario():
        response = FakeResponse()
        engine = RemoteEngine(fake_handle(response, 0), "m")
        with pytest.raises(NotReady, match="its replica is restarting"):
            await asyncio.wait_for(engine.generate(None, None, ctx()), 2)
        assert response.cancelled and engine.down_since is not None
        with pytest.raises(NotReady, match="recovering"):  # the next call, at once
            await engine.generate(None, None, ctx())
        await engine.stop()

    asyncio.run(scenario())


def test_a_call_queued_behind_live_replicas_keeps_waiting_for_its_turn():
    async def scenario():
        response = FakeResponse()
        engine = RemoteEngine(fake_handle(response, 1), "m")
        call = asyncio.create_task(engine.generate(None, None, ctx()))
        await asyncio.sleep(3 * ASSIGN_CHECK_S)
        assert not call.done()
        response.assign("the result")
        assert await call == "the result" and not response.cancelled

    asyncio.run(scenario())


def test_a_deployment_that_scales_to_zero_waits_for_a_replica_to_start():
    async def scenario():
        response = FakeResponse()
        engine = RemoteEngine(fake_handle(response, 0), "m", scales_to_zero=True)
        call = asyncio.create_task(engine.generate(None, None, ctx()))
        await asyncio.sleep(3 * ASSIGN_CHECK_S)
        assert not call.done()
        response.assign("started")
        assert await call == "started"

    asyncio.run(scenario())


def test_a_node_call_left_without_a_replica_is_503_too():
    async def scenario():
        response = FakeResponse()
        with pytest.raises(NotReady, match="its replica is restarting"):
            await asyncio.wait_for(RemoteNode(fake_handle(response, 0), "m")(None, ctx()), 2)
        assert response.cancelled

    asyncio.run(scenario())


def test_a_refusal_from_across_the_hop_is_raised_here():
    """The far side sends errors of the vocabulary back as values (so Serve does not log a
    client's bad input as a failed request); they are raised on this side, and a NotReady one
    still marks the model recovering."""
    from core.errors import InvalidField
    from core.protocol import Refusal

    async def scenario():
        response = FakeResponse()
        engine = RemoteEngine(fake_handle(response, 1), "m")
        response.assign(Refusal(InvalidField("params.x: bad", field="params.x")))
        with pytest.raises(InvalidField, match="params.x"):
            await engine.generate(None, None, ctx())
        assert engine.down_since is None
        response = FakeResponse()
        engine = RemoteEngine(fake_handle(response, 1), "m")
        response.assign(Refusal(NotReady("engine core is down")))
        with pytest.raises(NotReady):
            await engine.generate(None, None, ctx())
        assert engine.down_since is not None
        await engine.stop()

    asyncio.run(scenario())


def never_ready_handle(response: FakeResponse, statuses: list[str]):
    """A handle of an engine whose replica is gone for good: no replica to route to, and every
    status call (counted in ``statuses``) answers something other than ``ready``."""
    async def status():
        statuses.append("starting")
        return "starting"

    return SimpleNamespace(replicas=0, remote=lambda *args: response,
                           generate=SimpleNamespace(remote=lambda *args: response),
                           status=SimpleNamespace(remote=status))


async def probing_engine(statuses: list[str]) -> RemoteEngine:
    """A RemoteEngine that found its replica dead and probes it every 10 ms."""
    engine = RemoteEngine(never_ready_handle(FakeResponse(), statuses), "m")
    engine.PROBE_PERIOD_S = 0.01
    with pytest.raises(NotReady):
        await asyncio.wait_for(engine.generate(None, None, ctx()), 2)
    await asyncio.sleep(0.05)
    assert statuses, "the engine probes its replica"
    return engine


def test_stopping_a_remote_engine_ends_its_probe_of_a_replica_that_never_comes_back():
    async def scenario():
        statuses: list[str] = []
        engine = await probing_engine(statuses)
        await engine.stop()
        assert not engine.probing
        asked = len(statuses)
        await asyncio.sleep(0.05)
        assert len(statuses) == asked, "the probe still asks a removed model's engine"
        with pytest.raises(NotReady):  # a call still in flight fails; no probe starts again
            await asyncio.wait_for(engine.generate(None, None, ctx()), 2)
        assert not engine.probing

    asyncio.run(scenario())


def test_removing_a_model_from_the_router_stops_its_remote_engines_probe():
    """The ingress drops a removed model's pipeline in ``ModelRouter.update``, which stops
    every step of it: a remote engine that was probing a dead replica stops asking."""
    from pipelines.router import ModelRouter
    from pipelines.runner import Pipeline
    from pipelines.stages import LocalNode
    from nodes.common import Identity, Result
    from tests.support import model

    async def scenario():
        statuses: list[str] = []
        engine = await probing_engine(statuses)
        m = model("m")
        router = ModelRouter([Pipeline(m, LocalNode(Identity({}, m)), engine, LocalNode(Result({}, m)))])
        await router.update([], build=None, drain_timeout_s=1.0)
        asked = len(statuses)
        await asyncio.sleep(0.05)
        assert len(statuses) == asked, "the probe outlived its model"

    asyncio.run(scenario())


def test_a_step_whose_modules_this_node_lacks_fails_at_start_naming_the_node_and_modules():
    from pipelines.deployments import check_node

    class NeedsMissing:
        requires = ("json", "no_such_module_for_mmserve", "another_missing_one")

    with pytest.raises(RuntimeError) as err:
        check_node("m1", [NeedsMissing])
    message = str(err.value)
    assert message.startswith("node ") and "cannot run model 'm1'" in message
    assert "no_such_module_for_mmserve (ModuleNotFoundError" in message and "another_missing_one" in message
    assert "json (" not in message  # what it has is not listed
    check_node("m2", [type("Fine", (), {"requires": ("json",)})])


def test_an_in_process_engine_restarting_its_own_core_is_recovering_and_keeps_its_replica():
    """An engine whose core is in an actor of its own (``placement: remote_core``) starts the
    core again by itself: its model reads ``recovering``, and the ingress's health check (which
    restarts the ingress when an in-process engine is unhealthy) does not fail for it."""
    from engines.vllm import VLLMEngine
    from pipelines.stages import LocalEngine
    from core.config import ModelConfig

    m = ModelConfig(model_id="m", modality="text", pipeline="text", engine="vllm",
                    deployment={"placement": "remote_core"})
    engine = VLLMEngine(m)
    engine.core = SimpleNamespace(gone=True, why="killed")  # the watchdog found it gone
    engine.recovering = engine.dead = True
    local = LocalEngine(engine)
    local.started = True

    async def check():
        assert await local.status(1.0) == "recovering"
        await local.check_local()  # does not raise: the ingress stays up

    asyncio.run(check())


def test_a_refusal_of_vllms_serving_layer_while_the_core_is_dead_is_503():
    """vLLM's serving layer answers the cancellation of a request whose engine core died as a
    400 ("Client disconnected"); the engine gives the client the 503 it is."""
    from core.errors import InvalidField
    from core.config import ModelConfig
    from engines.vllm import VLLMEngine

    engine = VLLMEngine(ModelConfig(model_id="m", modality="text", pipeline="text", engine="vllm"))

    async def refused():
        engine.dead = True  # the watchdog saw the core die while vLLM was answering
        raise InvalidField("Client disconnected", model_id="m")
        yield  # pragma: no cover

    async def run():
        engine.dead = False
        with pytest.raises(NotReady, match="the vLLM engine died"):
            async for _ in engine._guarded(refused(), ctx()):
                pass

    asyncio.run(run())


def test_an_adapters_request_asks_serve_for_a_replica_holding_it():
    """Serve's model multiplexing routes by the handle call's ``multiplexed_model_id``: an
    adapter's name; the base model's requests go without one."""
    from core.protocol import Adapter

    seen = []

    class Handle:
        def options(self, **kw):
            seen.append(kw)
            return self

    engine = RemoteEngine(Handle(), "m")
    adapter = Adapter("sql", "/adapters/sql", "m")
    engine._handle(RequestContext(request_id="r", model_id="sql", adapter=adapter), stream=True)
    engine._handle(RequestContext(request_id="r", model_id="sql", adapter=adapter))
    assert engine._handle(ctx()) is engine.handle
    engine._handle(ctx(), stream=True)
    assert seen == [{"stream": True, "multiplexed_model_id": "sql"}, {"stream": False, "multiplexed_model_id": "sql"},
                    {"stream": True}]
