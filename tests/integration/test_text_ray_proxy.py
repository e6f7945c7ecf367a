"""The text pipeline behind Ray Serve's Python proxy (``server.http_proxy: ray``), the mode
that is not the default: it serves, streams, and a client that leaves a request without
streaming stops its generation at once (the proxy cancels the replica's call).

Marked slow (``make test-all``): it costs a Ray and a vLLM start-up of its own, and what it
adds to the default suite is small: the text path is checked on the default proxy in
tests/integration/vllm/, and the sweep test serves (and streams) through this proxy.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.vllm.test_text import MODEL, engine_stats, infer, stream_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = ["model=[tiny_llama]", "server.http_proxy=ray"]



def test_generates_and_streams(http):
    out = infer(http, prompt="Hello there", params={"max_tokens": 8, "temperature": 0})
    assert out["usage"]["completion_tokens"] == 8
    events = stream_events(http, prompt="Hello there", params={"max_tokens": 8, "temperature": 0})
    assert events[-1] == "[DONE]" and "".join(e["output"] for e in events[:-1]) == out["output"]


def test_client_disconnect_without_streaming_aborts(serve_app):
    body = {"model_id": MODEL, "prompt": "Go on", "params": {"max_tokens": 1900, "temperature": 0}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{serve_app}/v1/infer", json=body, timeout=1.0)  # the client gives up
    deadline = time.monotonic() + 2  # the generation alone would take ~6 s more
    while engine_stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the engine's own counter
    assert engine_stats()["running_requests"] == 0
