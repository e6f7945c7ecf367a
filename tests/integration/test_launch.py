"""``python -m apps.launch`` as a user runs it: it becomes ready, serves, and stops on SIGTERM;
a model that cannot start is reported, the others serve, and the exit status says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from apps.serving import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def wait_ready(log_path: Path, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until the launcher logs that it is ready (after Serve reports the app running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited early with {proc.returncode}: {log_path.read_text()[-3000:]}")
        if "model(s) served at" in log_path.read_text():
            return
        time.sleep(0.5)  # polling the launcher's log
    raise AssertionError("launcher not ready in time")


def test_launch_serves_what_starts_reports_what_does_not_and_stops_on_sigterm(tmp_path):
    port = free_port()
    log_path = tmp_path / "launch.log"
    log = open(log_path, "w+")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a user's own classifier whose directory is not there: its replica cannot start
    proc = subprocess.Popen([sys.executable, "-m", "apps.launch", "model=[echo,image_classifier]",
                             "model.image_classifier.source=/nonexistent/broken-net", f"server.port={port}",
                             f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(log_path, proc)
        out = log_path.read_text()
        assert "model broken-net failed to start" in out and "1 of 2 model(s) served at" in out, out[-3000:]
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and list(ready.json()["error"]["models"]) == ["broken-net"]
        listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert listed["echo"]["status"] == "ready" and listed["broken-net"]["status"] == "failed"
        assert "/nonexistent/broken-net" in listed["broken-net"]["status_detail"], listed["broken-net"]
        refused = httpx.post(f"{url}/v1/infer", json={"model_id": "broken-net", "input": "x"}, timeout=10)
        assert refused.status_code == 503 and "failed to start" in refused.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/infer", json={"model_id": "echo", "input": "hello"}, timeout=10)
        assert r.status_code == 200 and r.json()["output"] == "hello"

        # Graceful shutdown: a request in flight when SIGTERM arrives still completes.
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, f"{url}/v1/infer", timeout=30,
                               json={"model_id": "echo", "input": "late", "params": {"delay_s": 3}})
            time.sleep(1)  # let the slow request reach the engine
            proc.send_signal(signal.SIGTERM)
            r = slow.result()
        assert r.status_code == 200 and r.json()["output"] == "late"
        assert proc.wait(timeout=90) == 1  # served until stopped, but not every model started
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_path.read_text()
    assert "SIGTERM received: shutting down" in out, out[-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
