"""Scale to zero per model: the generated tiny ResNet's engine autoscales with ``min_replicas: 0``;
idle, it gives its replica back, and its next request waits for a new one (its weights loaded
again) within its deadline and is answered as before, not refused. The time that first answer
took is printed (BENCHMARKS.md, "Scale to zero").

Served in the package's Ray (conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests import media

pytestmark = pytest.mark.integration

MODEL = "tiny-resnet"
OVERRIDES = ["model=[tiny_resnet]", "pipeline=[vision]", "deployment=light",
             "+model.tiny_resnet.deployment.engine.autoscaling_config={min_replicas: 0, initial_replicas: 1, "
             "max_replicas: 1, upscale_delay_s: 0, downscale_delay_s: 1, look_back_period_s: 2}"]


def replicas() -> dict[str, int]:
    """The model's engine replicas by state, as Serve's controller counts them."""
    from ray import serve

    from pipelines.deployments import deployment_name, step_app_name

    app = serve.status().applications[step_app_name("mmserve", MODEL, "engine")]
    return dict(app.deployments[deployment_name(MODEL, "engine")].replica_states)


def running() -> int:
    return replicas().get("RUNNING", 0)


def test_an_idle_model_gives_its_replica_back_and_its_next_request_waits_for_a_new_one(serve_app):
    body = {"model_id": MODEL, "input": {"data": media.b64(media.encode_image(media.image(), "png"))}}
    with httpx.Client(base_url=serve_app, timeout=120) as http:
        first = http.post("/v1/infer", json=body)
        assert first.status_code == 200, first.text
        deadline = time.monotonic() + 90
        while any(replicas().values()):  # gone: not even stopping
            assert time.monotonic() < deadline, "the idle engine kept its replica for 90 s"
            time.sleep(0.5)  # the polling period of Serve's status
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(http.post, "/v1/infer", json=body)
            seen = {}  # when Serve's controller first showed each replica state
            while not answer.done():
                for state in replicas():
                    seen.setdefault(state, round(time.monotonic() - start, 1))
                time.sleep(0.2)  # the polling period of Serve's status
            again = answer.result()
        took = time.monotonic() - start
        assert again.status_code == 200, again.text
        assert again.json()["output"] == first.json()["output"]  # the same weights, the same answer
        assert running() == 1
        print(f"\nfirst answer from zero replicas: {took:.2f} s; replica states first seen at (s): {seen}")
