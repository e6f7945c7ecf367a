"""Traces of requests across the set's processes, received by a real OTLP/HTTP receiver
(conftest.py's ``otlp``; the set runs with ``server.tracing_endpoint`` pointing at it, so every
process got it through the launcher's environment): each request is one trace under the
client's ``traceparent``, with the ingress's span, one per step in the process that ran it, and
vLLM's own span of the request under the engine's.

The text default (``placement: remote_core``) runs vLLM's frontend in the ingress, so its spans
share the ingress's process; the tiny Whisper's engine has a deployment of its own, so its
engine span and vLLM's come from another process, the context having crossed a Ray call.
"""

from __future__ import annotations

import json
import secrets

import pytest

from tests import media

pytestmark = pytest.mark.integration

LLM, SPEECH, VLM = "tiny-llama", "tiny-whisper", "tiny-qwen2-vl"
SERVER, INTERNAL = 2, 1  # OTLP's span kinds
ERROR = 2  # OTLP's status code


def traceparent() -> tuple[str, str, str]:
    """A client's W3C header, its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def names(*wanted: str):
    return lambda spans: set(wanted) <= {s["name"] for s in spans}


def test_a_chat_request_is_one_trace_with_vllms_span_under_the_engines(http, otlp):
    header, trace_id, client_span = traceparent()
    r = http.post("/v1/chat/completions", headers={"traceparent": header}, json={
        "model": LLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-trace-id"] == trace_id
    spans = {s["name"]: s for s in otlp.trace(trace_id, names("POST /v1/chat/completions", "engine", "llm_request"))}
    ingress, engine, vllm = spans["POST /v1/chat/completions"], spans["engine"], spans["llm_request"]
    assert ingress["parent_id"] == client_span and ingress["kind"] == SERVER
    assert ingress["attributes"]["mmserve.model_id"] == LLM
    assert ingress["attributes"]["http.response.status_code"] == 200
    assert engine["parent_id"] == ingress["span_id"] and engine["kind"] == INTERNAL
    assert vllm["parent_id"] == engine["span_id"] and vllm["scope"].startswith("vllm")
    usage = r.json()["usage"]
    assert vllm["attributes"]["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert vllm["attributes"]["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    # vLLM's frontend runs in the ingress (the text default): one process, mmserve's resource
    assert {s["resource"]["process.pid"] for s in spans.values()} == {ingress["resource"]["process.pid"]}
    assert ingress["resource"]["mmserve.process"] == "ingress" and ingress["resource"]["service.name"] == "mmserve"


def test_a_stream_times_its_first_chunk_at_the_engine_and_at_the_client(http, otlp):
    header, trace_id, _ = traceparent()
    with http.stream("POST", "/v1/infer", headers={"traceparent": header}, json={
            "model_id": LLM, "input": "Once upon", "stream": True, "params": {"max_tokens": 8}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.status_code == 200 and events and r.headers["x-trace-id"] == trace_id
    spans = {s["name"]: s for s in otlp.trace(
        trace_id, names("POST /v1/infer", "preprocess", "engine", "postprocess", "llm_request"))}
    ingress, engine = spans["POST /v1/infer"], spans["engine"]
    for step in ("preprocess", "engine", "postprocess"):
        assert spans[step]["parent_id"] == ingress["span_id"], step
    assert spans["llm_request"]["parent_id"] == engine["span_id"]
    engine_first = engine["attributes"]["mmserve.time_to_first_chunk_s"]
    client_first = ingress["attributes"]["mmserve.time_to_first_chunk_s"]
    assert 0 < engine_first <= client_first  # the difference is what the ingress adds
    assert spans["llm_request"]["attributes"]["gen_ai.latency.time_to_first_token"] > 0


def test_a_speech_request_is_traced_into_its_engines_own_process(http, otlp):
    header, trace_id, _ = traceparent()
    r = http.post("/v1/audio/transcriptions", headers={"traceparent": header},
                  files={"file": ("speech.wav", media.encode_audio(media.clip_with_speech()))},
                  data={"model": SPEECH, "language": "en"})
    assert r.status_code == 200, r.text
    spans = {s["name"]: s for s in otlp.trace(
        trace_id, names("POST /v1/audio/transcriptions", "preprocess", "engine", "llm_request"))}
    ingress, pre, engine, vllm = (spans[n] for n in ("POST /v1/audio/transcriptions", "preprocess", "engine",
                                                     "llm_request"))
    assert pre["parent_id"] == engine["parent_id"] == ingress["span_id"]
    assert vllm["parent_id"] == engine["span_id"]
    # decoded in the ingress, transcribed in the engine's replica, where vLLM's span comes from too
    assert pre["resource"]["process.pid"] == ingress["resource"]["process.pid"]
    assert engine["resource"]["process.pid"] != ingress["resource"]["process.pid"]
    assert engine["resource"]["mmserve.process"] == f"engine {SPEECH}"
    assert vllm["resource"]["process.pid"] == engine["resource"]["process.pid"]


def test_a_vision_language_chat_checks_its_image_in_the_ingress_and_answers_in_its_engine(http, otlp):
    header, trace_id, _ = traceparent()
    image = media.data_url(media.encode_image(media.image(64, 48)))
    r = http.post("/v1/chat/completions", headers={"traceparent": header}, json={
        "model": VLM, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is it?"}]}]})
    assert r.status_code == 200, r.text
    spans = {s["name"]: s for s in otlp.trace(
        trace_id, names("POST /v1/chat/completions", "preprocess", "engine", "llm_request"))}
    ingress, pre, engine, vllm = (spans[n] for n in ("POST /v1/chat/completions", "preprocess", "engine",
                                                     "llm_request"))
    assert pre["parent_id"] == engine["parent_id"] == ingress["span_id"] and vllm["parent_id"] == engine["span_id"]
    assert engine["resource"]["mmserve.process"] == f"engine {VLM}"
    assert vllm["attributes"]["gen_ai.usage.prompt_tokens"] == r.json()["usage"]["prompt_tokens"]


def test_errors_are_recorded_with_their_type_where_they_happened(http, otlp):
    header, trace_id, _ = traceparent()
    r = http.post("/v1/audio/transcriptions", headers={"traceparent": header},
                  files={"file": ("speech.wav", b"not audio at all")}, data={"model": SPEECH})
    assert 400 <= r.status_code < 500 and r.headers["x-trace-id"] == trace_id
    kind = r.json()["error"]["type"]
    spans = {s["name"]: s for s in otlp.trace(trace_id, names("POST /v1/audio/transcriptions", "preprocess"))}
    ingress, pre = spans["POST /v1/audio/transcriptions"], spans["preprocess"]
    assert ingress["attributes"]["error.type"] == kind and ingress["attributes"]["http.response.status_code"] == r.status_code
    assert pre["status"] == ERROR and pre["attributes"]["error.type"] == kind and "exception" in pre["events"]
    assert "engine" not in spans  # it never reached the engine
