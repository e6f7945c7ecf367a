"""``python -m apps.bench -m`` as a user runs it: a tiny grid, end to end, with the summary."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apps.serving import free_port
from tests.support import NO_INGRESS_DRAIN

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run_bench(args: list[str], sweep_dir: Path, timeout_s: float) -> str:
    """Run a sweep to its end; on overrun SIGTERM the launcher itself (not its process group:
    that would kill Ray's GCS under it) so that it stops Ray, then kill it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "apps.bench", "-m", *args, f"server.port={free_port()}", NO_INGRESS_DRAIN,
                             f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise AssertionError(f"sweep overran {timeout_s}s: {out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def test_sweep_over_both_http_proxies_with_invalid_jobs_each_on_a_ray_of_its_own(tmp_path):
    # 4 jobs: echo-remote (its engine in a deployment of its own) behind HAProxy and behind
    # Serve's Python proxy, each with a valid and an invalid ingress limit (0); the invalid ones
    # are refused before anything starts. Serve's processes read server.http_proxy when they
    # start: each job of the basic launcher starts (and stops) its own local Ray, so the second
    # valid job does not inherit the first's mode. (What a sweep measures of a vLLM model's
    # streamed tokens is checked on the vLLM set, in tests/integration/vllm/test_text.py,
    # without a vLLM start of its own here.)
    out = run_bench(["model=echo_remote", "server.http_proxy=haproxy,ray",
                     "deployment.ingress.max_ongoing_requests=100,0",
                     "load.concurrency=4", "load.duration_s=2", "load.warmup_s=1"],
                    tmp_path, timeout_s=300)

    rows = {int(r["job"]): r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert [rows[n]["status"] for n in range(4)] == ["ok", "invalid", "ok", "invalid"], \
        [(r["status"], r["error"]) for r in rows.values()]
    for n in (1, 3):
        assert "deployment.ingress.max_ongoing_requests" in rows[n]["error"]
    haproxy, python_proxy = rows[0], rows[2]
    assert "server.http_proxy=haproxy" in haproxy["overrides"] and "server.http_proxy=ray" in python_proxy["overrides"]
    for row in (haproxy, python_proxy):
        assert row["model_id"] == "echo-remote"
        assert float(row["rps"]) > 0 and int(row["errors"]) == 0
        assert 0 < float(row["p50_ms"]) <= float(row["p99_ms"])
        assert row["output_tok_s"] == ""  # echo counts no tokens
    assert "started a local Ray (http_proxy haproxy)" in out and "started a local Ray (http_proxy ray)" in out

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best"] in (0, 2) and summary["axes"] == ["p99_ms", "rps"]
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "best.yaml").exists()
    assert "invalid" in out and "★" in out  # the Rich table on the terminal
    job = json.loads((tmp_path / "2" / "result.json").read_text())
    assert job["load"]["concurrency"] == 4 and job["deploy_s"] > 0


def test_ray_launcher_runs_jobs_as_ray_tasks(tmp_path):
    # hydra-ray-launcher on a local Ray it starts: both jobs run at once, as Ray tasks, and
    # deploy side by side in the one Serve instance under their own names and prefixes.
    out = run_bench(["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=null",
                     "load.concurrency=1,2", "load.duration_s=1", "load.warmup_s=0.5"],
                    tmp_path, timeout_s=180)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"], out[-4000:]
    assert "_run_job" in out  # the jobs' logs come from Ray tasks
