"""``python -m apps.launch`` as a user runs it: it becomes ready, serves, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited early with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling the readiness endpoint
    raise AssertionError("launcher not ready in time")


def test_launch_serves_the_default_and_stops_on_sigterm(tmp_path):
    port = free_port()
    log = open(tmp_path / "launch.log", "w+")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "apps.launch", f"server.port={port}",
                             f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        r = httpx.post(f"{url}/v1/infer", json={"model_id": "echo", "input": "hello"}, timeout=10)
        assert r.status_code == 200 and r.json()["output"] == "hello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    out = log.read()
    assert "ready: 1 model(s) served" in out and "SIGTERM received: shutting down" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
