"""The text pipeline on real vLLM (CPU) with the generated tiny Llama, over real HTTP.

One vLLM start-up for the whole module (tens of seconds on 2 cores).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

# The engine in its own deployment: streaming, cancellation and restarts cross a handle hop.
OVERRIDES = ["model=[tiny_llama]", "model.tiny_llama.deployment.placement=engine"]
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app, timeout=120) as client:
        yield client


def infer(http, **body) -> dict:
    r = http.post("/v1/infer", json={"model_id": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(http, **body) -> list[dict | str]:
    events = []
    with http.stream("POST", "/v1/infer", json={"model_id": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def engine_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"{MODEL}.engine", app_name="mmserve").stats.remote().result()


def test_generates_text_with_usage(http):
    out = infer(http, prompt="Hello there", params={"max_tokens": 8, "temperature": 0})
    assert isinstance(out["output"], str) and out["output"]
    assert out["usage"]["completion_tokens"] == 8 and out["usage"]["prompt_tokens"] > 0
    assert out["finish_reason"] == "length"


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_bounds_the_output(http, max_tokens):
    out = infer(http, prompt="Count", params={"max_tokens": max_tokens, "temperature": 0})
    assert out["usage"]["completion_tokens"] == max_tokens


def test_seed_makes_sampling_repeatable(http):
    params = {"max_tokens": 16, "temperature": 1.0, "seed": 7}
    a = infer(http, prompt="Once upon", params=params)["output"]
    b = infer(http, prompt="Once upon", params=params)["output"]
    c = infer(http, prompt="Once upon", params={**params, "seed": 8})["output"]
    assert a == b
    assert a != c


def test_stop_string_stops(http):
    greedy = {"max_tokens": 24, "temperature": 0}
    full = infer(http, prompt="The quick", params=greedy)["output"]
    stop = full[4:7]
    assert stop
    cut = infer(http, prompt="The quick", params={**greedy, "stop": [stop]})
    assert cut["output"] == full[:full.find(stop)]
    assert cut["finish_reason"] == "stop"


def test_chat_messages_go_through_the_chat_template(http):
    from transformers import AutoTokenizer

    from engines.checkpoints import resolve_source

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = infer(http, messages=messages, params={"max_tokens": 4})
    tok = AutoTokenizer.from_pretrained(resolve_source("generated:tiny-llama"))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_stream_matches_the_whole_answer(http):
    params = {"max_tokens": 12, "temperature": 0}
    whole = infer(http, prompt="Stream me", params=params)
    events = stream_events(http, prompt="Stream me", params=params)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 1
    assert "".join(c["output"] for c in chunks) == whole["output"]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("params,field", [
    ({"temperature": 3}, "params.temperature"),
    ({"top_p": 0}, "params.top_p"),
    ({"presence_penalty": -5}, "params.presence_penalty"),
    ({"max_tokens": 0}, "params.max_tokens"),
    ({"beam_width": 2}, "params.beam_width"),
])
def test_invalid_params_are_422(http, params, field):
    r = http.post("/v1/infer", json={"model_id": MODEL, "prompt": "x", "params": params})
    assert r.status_code == 422 and r.json()["error"]["field"] == field


def test_prompt_over_the_context_is_422_with_both_numbers(http):
    r = http.post("/v1/infer", json={"model_id": MODEL, "prompt": "a b c d " * 1000})
    err = r.json()["error"]
    assert r.status_code == 422 and "tokens; the model's context is 2048 tokens" in err["message"]


def test_client_disconnect_aborts_the_generation(serve_app):
    assert engine_stats()["running_requests"] == 0
    body = {"model_id": MODEL, "prompt": "Go on", "stream": True,
            "params": {"max_tokens": 1900, "temperature": 0}}  # about 6 s of generation here
    with httpx.Client(base_url=serve_app, timeout=60) as client:
        with client.stream("POST", "/v1/infer", json=body) as r:
            lines = r.iter_lines()  # not closed until the block ends: closing it disconnects
            events = 0
            while events < 3:
                events += next(lines).startswith("data: ")
            assert engine_stats()["running_requests"] == 1
        # leaving the block closes the connection mid-stream
    # Well before the ~6 s the generation would need to finish by itself: it was aborted.
    deadline = time.monotonic() + 2
    while engine_stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the engine's own counter
    assert engine_stats()["running_requests"] == 0


def test_abandoned_request_without_streaming_ends_at_its_deadline(serve_app):
    """Behind HAProxy (server.http_proxy: haproxy) a client's close reaches the replica only
    when there is something to send it: a request it abandoned before its answer runs on until
    its deadline ends it (test_text_ray_proxy.py: with Serve's Python proxy it stops at once)."""
    body = {"model_id": MODEL, "prompt": "Go on", "params": {"max_tokens": 1900, "temperature": 0,
                                                             "timeout_s": 2}}
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{serve_app}/v1/infer", json=body, timeout=1.0)  # the client gives up
    deadline = t0 + 3.5  # the generation alone would take ~7 s
    while engine_stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the engine's own counter
    assert engine_stats()["running_requests"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_deadline_aborts_the_generation(http, stream):
    body = {"model_id": MODEL, "prompt": "Go on", "stream": stream,
            "params": {"max_tokens": 1900, "temperature": 0, "timeout_s": 0.5}}
    r = http.post("/v1/infer", json=body)
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        err = events[-1]["error"]
    else:
        assert r.status_code == 504
        err = r.json()["error"]
    assert err["type"] == "deadline_exceeded" and "engine" in err["message"]
    deadline = time.monotonic() + 2  # far less than the generation would take
    while engine_stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the engine's own counter
    assert engine_stats()["running_requests"] == 0


def test_openai_client_on_both_routes(serve_app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{serve_app}/v1", api_key="unused")
    assert MODEL in [m.id for m in client.models.list()]

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"

    parts = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == 6

    comp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens == 5
    streamed = "".join(p.choices[0].text for p in client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert streamed == comp.choices[0].text


def test_model_is_listed_ready(http):
    one = http.get(f"/v1/models/{MODEL}").json()
    assert one["status"] == "ready" and one["engine"] == "vllm"
    assert one["engine_kwargs"]["max_model_len"] == 2048


def test_dead_engine_core_gives_503_then_serve_restarts_it(http):
    """Kept last: it kills vLLM's engine core process and waits for the replica to come back."""
    import psutil

    def engine_cores():  # vLLM retitles the process; its name holds the title's first 15 characters
        return [p for p in psutil.process_iter(["name", "cmdline"])
                if "EngineCor" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])]

    deadline = time.monotonic() + 10
    while not (cores := engine_cores()) and time.monotonic() < deadline:
        time.sleep(0.5)  # a /proc read can miss a process for a moment; look again
    assert cores, "no vLLM engine core process found"
    for p in cores:
        p.kill()

    body = {"model_id": MODEL, "prompt": "still there?", "params": {"max_tokens": 4}}
    deadline = time.monotonic() + 30
    while True:
        r = http.post("/v1/infer", json=body, timeout=10)  # each answer comes fast: no hang
        if r.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # until the engine notices its core is gone
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "not_ready" and r.json()["error"]["model_id"] == MODEL

    deadline = time.monotonic() + 240
    while http.get("/ready", timeout=10).status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)  # Serve's health check restarts the replica, vLLM starts again
    assert http.post("/v1/infer", json=body).status_code == 200
