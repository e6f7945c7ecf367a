"""LoRA adapters on real vLLM (CPU), over real HTTP: the tiny Llama's generated adapter from its
config (``lora_modules``, as in the embedded default), more loaded and unloaded at run time
through vLLM's routes and bodies, each served under its own model id on every route; more
adapters in use than vLLM keeps (``max_loras`` and ``max_cpu_loras`` are 1 here), each still
answering as itself. Outputs are greedy, so an adapter's answer is the same every time and
differs from the base model's.

Served with the package's vLLM set (conftest.py: runtime loading allowed).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.integration

BASE, ADAPTER = "tiny-llama", "tiny-llama-lora"
PROMPT = "The quick brown fox"


def complete(http, model: str, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two more adapters of the tiny Llama, as directories (other seeds of the generated one)."""
    from engines.checkpoints import make_tiny_llama_lora

    paths = {}
    for seed in (2, 3):
        paths[f"lora-{seed}"] = path = tmp_path_factory.mktemp(f"lora-{seed}")
        make_tiny_llama_lora(path, seed=seed)
    return {name: str(p) for name, p in paths.items()}


def test_the_configured_adapter_answers_as_itself_on_every_route(http):
    base, adapted = complete(http, BASE), complete(http, ADAPTER)
    assert adapted != base and adapted == complete(http, ADAPTER)  # greedy: itself, every time
    r = http.post("/v1/infer", json={"model_id": ADAPTER, "prompt": PROMPT,
                                     "params": {"max_tokens": 12, "temperature": 0}})
    assert r.status_code == 200 and r.json()["model_id"] == ADAPTER
    assert r.json()["output"] == adapted  # the text pipeline generates with the adapter too
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    answers = [http.post("/v1/chat/completions", json={"model": m, **chat}).json() for m in (BASE, ADAPTER)]
    assert answers[1]["model"] == ADAPTER
    assert answers[0]["choices"][0]["message"]["content"] != answers[1]["choices"][0]["message"]["content"]


def test_the_adapter_is_listed_with_its_base_as_parent(http):
    data = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert data[ADAPTER]["parent"] == BASE and data[ADAPTER]["status"] == "ready"
    assert http.get(f"/v1/models/{ADAPTER}").json()["parent"] == BASE


def test_adapters_loaded_at_run_time_serve_beside_each_other_beyond_max_loras(http, serve_app, adapters):
    for name, path in adapters.items():
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' added successfully."
    assert http.get("/v1/models/lora-2").json()["root"] == adapters["lora-2"]
    models = [BASE, ADAPTER, *adapters]
    alone = {m: complete(http, m) for m in models}
    assert len(set(alone.values())) == len(models)  # four models, four answers

    async def interleaved():
        async with httpx.AsyncClient(base_url=serve_app, timeout=120) as c:
            async def one(model):
                r = await c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 12,
                                                          "temperature": 0})
                assert r.status_code == 200, r.text
                return model, r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(m) for m in models * 4))

    # vLLM holds one adapter per batch and one in memory here: the others are evicted and loaded
    # again as requests for them come in; none is lost and each answers as it did alone
    for model, text in asyncio.run(interleaved()):
        assert text == alone[model], model

    for name in adapters:
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 200 and "removed" in r.text
    r = http.post("/v1/completions", json={"model": "lora-2", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 404 and "lora-2" in r.json()["error"]["message"]
    assert complete(http, ADAPTER) == alone[ADAPTER]


def test_an_unknown_adapter_is_404_and_a_bad_path_400_naming_it_and_the_model_serves_on(http, tmp_path):
    r = http.post("/v1/completions", json={"model": "no-such-lora", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 404 and ADAPTER in r.json()["error"]["message"]  # the ids served
    missing = str(tmp_path / "missing")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": missing})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["field"] == "lora_path" and missing in err["message"]
    (tmp_path / "not-lora").mkdir()
    (tmp_path / "not-lora" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64}')
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(tmp_path / "not-lora")})
    assert r.status_code == 400 and r.json()["error"]["field"] == "lora_path", r.text
    assert "broken" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "broken"})
    assert r.status_code == 404
    assert complete(http, BASE) and complete(http, ADAPTER)


def test_an_adapters_requests_are_counted_under_its_own_id(http):
    complete(http, ADAPTER, max_tokens=2)
    lines = [line for line in http.get("/metrics").text.splitlines()
             if line.startswith("mmserve_requests_total{") and f'model_id="{ADAPTER}"' in line]
    assert lines and any('code="200"' in line for line in lines)
