"""LoRA adapters over two engine replicas of one base model, on real vLLM (CPU): a request for an
adapter goes to the replica that holds it (Serve's model multiplexing), and a hot adapter spills
over to the other replica when the one that holds it is busy rather than queueing there; each
adapter answers as vLLM's own server answers with the same adapter.

The generated tiny Llama served as a user's own model is (``model=llm`` with its directory as
the source), with ``placement: engine`` and two replicas of its engine, each a vLLM of its own;
``max_loras`` (and so what a replica holds) 1; two adapters loaded at run time. Two vLLM starts
on two cores: marked slow (``pytest -m slow tests/integration/test_lora_replicas.py``; the
last run is in docs/testing.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from typing import Iterator

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "tiny-llama"


def overrides() -> list[str]:
    """The generated tiny Llama as a user's own model, in one override of conf/model/llm.yaml
    (its model id from its directory's name), with two engine replicas that take adapters."""
    from engines.checkpoints import resolve_source

    return [
        "model=llm", f"model.llm.source={resolve_source('generated:tiny-llama')}", "pipeline=[text]",
        "model.llm.deployment.placement=engine", "+model.llm.deployment.engine.num_replicas=2",
        "model.llm.deployment.engine.ray_actor_options.num_cpus=0",
        "+model.llm.engine_kwargs.enable_lora=true", "+model.llm.engine_kwargs.max_lora_rank=8",
        # a replica is busy at two requests: a third for its adapter goes to the other one
        "+model.llm.engine_kwargs.max_num_seqs=2", "model.llm.deployment.engine.max_ongoing_requests=2",
        "+model.llm.engine_kwargs.enforce_eager=true",
        "server.allow_runtime_lora_updating=true",
    ]


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory) -> dict[str, str]:
    from engines.checkpoints import make_tiny_llama_lora

    paths = {}
    for seed, name in ((2, "lora-a"), (3, "lora-b")):
        path = tmp_path_factory.mktemp(name)
        make_tiny_llama_lora(path, seed=seed)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module")
def serve_app(adapter_paths):
    from apps.config import compose
    from apps.serving import free_port, served

    cfg = compose([*overrides(), f"server.port={free_port()}"])
    assert list(cfg.model) == ["llm"] and cfg.model["llm"].model_id == BASE
    with served(cfg, num_cpus=2, logging_level="ERROR", log_to_driver=False) as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for name, path in adapter_paths.items():
                r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
                assert r.status_code == 200, r.text
        yield server.url


@contextlib.contextmanager
def vllms_own_server(model) -> Iterator[str]:
    """vLLM's own OpenAI server (what ``vllm serve`` runs) with the model's options as its flags,
    for the ``with`` block: its URL once ``/health`` answers."""
    from apps.serving import free_port
    from engines.checkpoints import resolve_source
    from engines.vllm import VLLMKwargs

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
                             "--model", resolve_source(model.source), "--served-model-name", model.model_id,
                             "--port", str(port), *model.options(VLLMKwargs).serve_flags(cpu=True)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"vLLM's server exited with {proc.returncode}"
            assert time.monotonic() < deadline, "vLLM's server did not answer /health in 600 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)  # the polling period of a readiness check
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def replicas() -> dict[str, dict]:
    """Each engine replica's stats (its adapters loaded, the adapters it took on), by replica:
    Serve picks a replica at random for each call, and 40 calls reach both but once in 2^39."""
    from ray import serve

    from pipelines.deployments import deployment_name, step_app_name

    handle = serve.get_deployment_handle(deployment_name(BASE, "engine"), step_app_name("mmserve", BASE, "engine"))
    found = {}
    for _ in range(40):
        stats = handle.stats.remote().result()
        found[stats["replica"]] = stats
    assert len(found) == 2
    return found


async def _completions(url: str, models: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def one(model: str) -> str:
            r = await c.post("/v1/completions", json={"model": model, "prompt": "The quick brown fox",
                                                      "max_tokens": 64, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        return await asyncio.gather(*(one(m) for m in models))


def test_each_adapter_answers_as_vllms_own_server_with_the_same_adapter(serve_app, adapter_paths):
    from apps.config import compose

    listed = ", ".join(f"{{name: {n}, path: '{p}'}}" for n, p in adapter_paths.items())
    model = compose([*overrides(), f"++model.llm.engine_kwargs.lora_modules=[{listed}]"]).model["llm"]
    ours = {m: asyncio.run(_completions(serve_app, [m]))[0] for m in (BASE, *adapter_paths)}
    with vllms_own_server(model) as url:
        theirs = {m: asyncio.run(_completions(url, [m]))[0] for m in (BASE, *adapter_paths)}
    assert ours == theirs and len(set(ours.values())) == 3


def test_each_adapter_is_served_by_the_replica_that_holds_it_and_a_hot_one_spills_over(serve_app):
    for model in ["lora-a", "lora-b"] * 3:  # each replica comes to hold one of them
        asyncio.run(_completions(serve_app, [model]))
    loads = sum(s["adapter_loads"] for s in replicas().values())
    # one at a time, each adapter's requests go to the replica holding it: none is loaded again
    # (at random, an adapter would change replica at half its requests, each a load there)
    for model in ["lora-a", "lora-b"] * 4:
        asyncio.run(_completions(serve_app, [model]))
    assert sum(s["adapter_loads"] for s in replicas().values()) == loads
    # eight at once for lora-a: its replica takes two (max_ongoing_requests), the others go to
    # the other replica, which takes it on beside (or instead of) its own, rather than wait
    texts = asyncio.run(_completions(serve_app, ["lora-a"] * 8))
    assert len(set(texts)) == 1  # greedy, one adapter on both replicas: one answer
    now = replicas()
    assert sum(s["adapter_loads"] for s in now.values()) > loads
    assert all("lora-a" in s["adapters"] for s in now.values())
