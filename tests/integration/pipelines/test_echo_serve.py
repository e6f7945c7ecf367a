"""The echo pipeline on a real Ray Serve, over real HTTP, in all three placements."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

# inline (every node in the ingress), engine (one hop), split (a deployment per node)
OVERRIDES = ["model=[echo,echo_remote,echo_split]", "server.max_body_bytes=4096",
             # small limits on the remote engine, to see Serve's backpressure
             "model.echo_remote.deployment.engine.max_ongoing_requests=2",
             "++model.echo_remote.deployment.engine.max_queued_requests=2"]
MODELS = ["echo", "echo-remote", "echo-split"]



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

    apps = {name: set(app.deployments) for name, app in serve.status().applications.items()}
    # the ingress alone in its application; each step of a model in its own deployment, in
    # an application of its own (so that models come and go apart)
    assert apps == {"mmserve": {"ingress"}, "mmserve.echo-remote.engine": {"echo-remote.engine"},
                    **{f"mmserve.echo-split.{s}": {f"echo-split.{s}"}
                       for s in ("preprocess", "engine", "postprocess")}}


async def _burst(base_url: str, n: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/infer", json=body) for _ in range(n)))


def test_the_ray_internals_mmserve_reads_are_there_on_real_handles(serve_app):
    """``core.internals`` against Ray's own objects: a Ray upgrade that moves them fails here."""
    import asyncio

    from ray import serve

    from core import internals

    async def read():
        handle = serve.get_deployment_handle("echo-remote.engine", app_name="mmserve.echo-remote.engine")
        response = handle.status.remote()
        await internals.assignment(response)  # completes once a replica has the call
        assert await response == "ready"
        return internals.check_ray_handle(handle), internals.routable_replicas(handle)

    assert asyncio.run(read()) == (True, 1)


def test_remote_engine_backpressure_refuses_the_excess_at_once(serve_app):
    body = {"model_id": "echo-remote", "input": 1, "params": {"delay_s": 0.5}}
    t0 = time.monotonic()
    rs = asyncio.run(_burst(serve_app, 12, body))
    statuses = [r.status_code for r in rs]
    refused = [r for r in rs if r.status_code == 503]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2 and len(refused) >= 6, statuses
    assert all(r.json()["error"]["type"] == "overloaded" and r.headers["retry-after"] for r in refused)
    # refused at once: the burst ends about when the admitted ones (2 waves of 0.5 s) do
    assert time.monotonic() - t0 < 5


def test_replica_kill_under_load_fails_fast_then_recovers(serve_app):
    """Steady load on echo-remote; its engine replica is killed; every request succeeds or
    fails fast with 503, none outlives its deadline, and after recovery all succeed.

    Requests spend 0.3 s in the engine, so the kill (which Ray carries out a moment after the
    call returns) finds them in flight, the path that marks the model recovering. One that
    reaches Serve's router only after the death is the next test's case."""
    import ray

    body = {"model_id": "echo-remote", "input": 1, "params": {"delay_s": 0.3, "timeout_s": 10}}
    outcomes: list[tuple[int, float]] = []

    async def load(seconds: float):
        async with httpx.AsyncClient(base_url=serve_app, timeout=30) as client:
            async def worker():
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    r = await client.post("/v1/infer", json=body)
                    outcomes.append((r.status_code, time.monotonic() - t0))
            await asyncio.gather(*(worker() for _ in range(2)))

    replica = engine_replica("echo-remote")

    async def scenario():
        task = asyncio.create_task(load(6))
        await asyncio.sleep(1)  # load running before the kill
        await asyncio.to_thread(ray.kill, replica, no_restart=True)  # the clients keep going
        await task

    asyncio.run(scenario())
    statuses = {s for s, _ in outcomes}
    assert statuses <= {200, 503}, statuses
    assert max(latency for _, latency in outcomes) < 10  # nothing hung past its deadline
    refusals = [t for s, t in outcomes if s == 503]
    assert refusals and max(refusals) < 1.0  # while recovering, 503 at once
    print(f"replica kill: {len(outcomes)} requests, {sum(s == 200 for s, _ in outcomes)} ok, "
          f"{sum(s == 503 for s, _ in outcomes)} fast 503, slowest {max(t for _, t in outcomes):.2f} s")

    wait_until_serving(serve_app, body)
    after = [httpx.post(f"{serve_app}/v1/infer", json=body, timeout=15) for _ in range(4)]
    assert [r.status_code for r in after] == [200] * 4  # sequential: within the small limits


def test_request_after_an_idle_replica_died_gets_503_not_a_wait_for_the_replacement(serve_app):
    """No request in flight when the engine replica dies: the next one meets the dead replica
    in Serve's router, which would hold it until the replacement is up. It gets 503 at once
    instead, and the model serves again once the replacement is."""
    import ray

    body = {"model_id": "echo-remote", "input": 1, "params": {"timeout_s": 20}}
    wait_until_serving(serve_app, body)  # the replica of the previous test's kill, if it ran
    ray.kill(engine_replica("echo-remote"), no_restart=True)
    t0 = time.monotonic()
    r = httpx.post(f"{serve_app}/v1/infer", json=body, timeout=30)
    assert r.status_code == 503 and time.monotonic() - t0 < 2, (r.status_code, time.monotonic() - t0)
    assert r.json()["error"]["type"] == "not_ready" and r.headers["retry-after"]
    wait_until_serving(serve_app, body)


def engine_replica(model_id: str):
    """The actor of a model's only engine replica."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{model_id}.engine" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def wait_until_serving(url: str, body: dict, timeout_s: float = 60) -> None:
    """Poll until ``body`` is served (Serve has replaced a killed replica)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.post(f"{url}/v1/infer", json=body, timeout=15).status_code == 200:
            return
        time.sleep(0.5)  # polling the replacement's start, not waiting for readiness blindly
    raise AssertionError(f"{body['model_id']} not serving again within {timeout_s} s")
