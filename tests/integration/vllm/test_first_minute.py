"""The first minute of the vLLM set as a client saw it (``conftest.Probe``): the ingress answers
and echo serves while the four vLLM engines load, a request for the tiny Llama meanwhile gets
503 naming its state with Retry-After, and then every model is ready."""

from __future__ import annotations

import pytest

from tests.integration.vllm.conftest import STARTUP

pytestmark = pytest.mark.integration

VLLM_MODELS = ("tiny-llama", "all-minilm-l6-v2", "tiny-whisper", "tiny-qwen2-vl")


def test_the_ingress_and_echo_answer_before_the_vllm_models_are_ready_then_all_are(http):
    ready = {m: STARTUP.get(f"{m} ready") for m in VLLM_MODELS}
    assert all(t is not None for t in ready.values()), STARTUP
    first_vllm = min(ready.values())
    assert STARTUP["/health"] < first_vllm and STARTUP["echo served"] < first_vllm, STARTUP
    assert http.get("/ready").status_code == 200

    starting = STARTUP["tiny-llama starting"]
    assert starting["status"] == 503 and starting["headers"]["retry-after"] == "5", starting
    error = starting["body"]["error"]
    assert error["type"] == "not_ready" and error["message"].startswith("model 'tiny-llama' is starting ("), error

    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert all(listed[m]["status"] == "ready" and listed[m]["ready_after_s"] > 0 for m in VLLM_MODELS), listed
