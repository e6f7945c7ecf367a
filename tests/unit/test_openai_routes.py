"""The OpenAI-compatible routes' plumbing in-process (no Ray, no vLLM), over an engine that
speaks a scripted protocol: what the API layer adds around an engine's own answers."""

from __future__ import annotations

import asyncio
import json

import pytest

from api.app import create_app
from core.config import ServerConfig
from tests.support import ScriptedOpenAIEngine, local_pipeline, local_router, model
from tests.unit.test_ingress import call, error_of


@pytest.fixture
def app():
    router = asyncio.run(local_router(local_pipeline(model("echo")),
                                      local_pipeline(model("chatty"), ScriptedOpenAIEngine)))
    return create_app(router, ServerConfig(max_string_chars=50))


def test_a_whole_answer_is_the_engines_body(app):
    body = {"model": "chatty", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    r = call(app, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json() == {"route": "chat", "body": body}
    r = call(app, "POST", "/v1/completions", json={"model": "chatty", "prompt": "x"})
    assert r.json()["route"] == "completion"


def test_a_stream_passes_the_engines_events_as_they_are(app):
    r = call(app, "POST", "/v1/completions", json={"model": "chatty", "prompt": "x", "stream": True, "events": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events == [f'data: {{"route": "completion", "n": {i}}}' for i in range(3)] + ["data: [DONE]"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_is_an_http_error_even_when_streamed(app, stream):
    err = error_of(call(app, "POST", "/v1/chat/completions", json={
        "model": "chatty", "messages": [], "refuse": "top_logprobs", "stream": stream}), 400)
    assert err["param"] == "top_logprobs" and err["field"] == "top_logprobs" and err["code"] == 400
    assert call(app, "POST", "/v1/completions", json={"model": "chatty", "prompt": "x"}).status_code == 200


def test_routes_the_model_does_not_serve_are_refused_naming_those_it_does(app):
    err = error_of(call(app, "POST", "/v1/embeddings", json={"model": "chatty", "input": "x"}), 400)
    assert "chat, completion" in err["message"]


def test_the_deadline_bounds_a_whole_answer_and_ends_a_stream(app):
    err = error_of(call(app, "POST", "/v1/completions", json={"model": "chatty", "prompt": "x", "delay_s": 5},
                        headers={"x-request-timeout": "0.2"}), 504)
    assert err["type"] == "deadline_exceeded"
    r = call(app, "POST", "/v1/completions", json={"model": "chatty", "prompt": "x", "stream": True,
                                                  "delay_s": 5}, headers={"x-request-timeout": "0.2"})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0] == 'data: {"route": "completion", "n": 0}'
    assert json.loads(events[-1][len("data: "):])["error"]["type"] == "deadline_exceeded"


def test_server_limits_apply_to_openai_bodies(app):
    err = error_of(call(app, "POST", "/v1/chat/completions", json={
        "model": "chatty", "messages": [{"role": "user", "content": "y" * 51}]}), 422)
    assert err["field"] == "messages.0.content"
    assert error_of(call(app, "POST", "/v1/chat/completions", content=b"{nope",
                         headers={"content-type": "application/json"}), 400)["type"] == "bad_request"


def test_models_list_the_openai_routes_each_model_serves(app):
    data = {m["id"]: m for m in call(app, "GET", "/v1/models").json()["data"]}
    assert data["chatty"]["openai_routes"] == ["chat", "completion"]
    assert data["echo"]["openai_routes"] == []
