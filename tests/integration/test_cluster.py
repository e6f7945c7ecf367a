"""A real two-node Ray cluster on this machine (a head, and a second raylet with its own HOME,
temporary directory and a custom resource), joined with token authentication as a user's
launcher on another machine would join it:

- the launcher, run from a copy of the project that is deleted once it has deployed, ships the
  code in the job's runtime environment: an engine pinned to the second node runs there, and
  after the copy is gone a replacement of that replica still starts and answers;
- ``python -m apps.export`` writes a Serve config that ``serve deploy`` serves on that cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from apps.serving import PROJECT_ROOT, free_port

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")
REMOTE = "echo-remote"


def _stop(paths: list[str]) -> None:
    """Kill the processes of our nodes only (``ray stop`` would stop every Ray on the machine)."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    ours = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in me
            and any(path in " ".join(p.info["cmdline"] or []) for path in paths)]
    for p in ours:
        for child in p.children(recursive=True) + [p]:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs(ours, timeout=20)


def until(check, timeout_s: float, what: str, process: subprocess.Popen | None = None):
    """Poll ``check`` until it returns something truthy (each call does a real request);
    fail at once, with its output, if ``process`` (the launcher) has exited meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the launcher exited ({process.returncode}): {process.stdout.read()[-3000:]}")
        try:
            if found := check():
                return found
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s:g}s: {what}")


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="mm-cl-", dir="/tmp"))  # short: Ray's socket paths
    head_home, node_home = base / "head", base / "node2"
    head_home.mkdir()
    node_home.mkdir()
    port, dashboard, http = free_port(), free_port(), free_port()
    common = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    common["RAY_USAGE_STATS_ENABLED"] = "0"
    token = head_home / ".ray" / "auth_token"
    joining = {**common, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    temps = [str(base / "t1"), str(base / "t2")]
    try:
        subprocess.run([RAY, "get-auth-token", "--generate"], env={**common, "HOME": str(head_home)},
                       cwd=base, check=True, capture_output=True)
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1",
                        f"--dashboard-port={dashboard}", "--include-dashboard=true",
                        f"--temp-dir={temps[0]}", "--disable-usage-stats"],
                       env={**common, "HOME": str(head_home), "RAY_AUTH_MODE": "token"}, cwd=base,
                       check=True, capture_output=True)
        assert token.exists(), "the head wrote no auth token"
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                        '--resources={"node2": 10}', f"--temp-dir={temps[1]}"],
                       env={**joining, "HOME": str(node_home)}, cwd=base, check=True, capture_output=True)
        yield {"base": base, "address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}",
               "http": http, "env": {**joining, "HOME": str(base), "RAY_ADDRESS": f"127.0.0.1:{port}"}}
    finally:
        _stop(temps)
        shutil.rmtree(base, ignore_errors=True)


def ray_state(cluster, code: str) -> str:
    """Run ``code`` in a driver of its own on the cluster (the test process stays off Ray)."""
    out = subprocess.run([sys.executable, "-c", code], env=cluster["env"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


NODE_OF_ENGINE = f"""
import ray
from ray.util.state import list_actors
ray.init(logging_level="ERROR")
node2 = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node2" in n["Resources"]]
engines = [a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
           if a.class_name.endswith("{REMOTE}.engine")]
print(engines == node2 and len(node2) == 1)
"""

KILL_ENGINE = f"""
import ray
ray.init(logging_level="ERROR")
names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "{REMOTE}.engine" in a["name"]]
for a in names:
    ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
print(len(names))
"""


def test_launcher_ships_the_code_and_pins_an_engine_to_the_second_node(cluster):
    copy = cluster["base"] / "copy" / "mmserve"
    shutil.copytree(PROJECT_ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "multirun", "__pycache__", ".hypothesis", ".pytest_cache"))
    url = f"http://127.0.0.1:{cluster['http']}"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "apps.launch", "model=[echo,echo_remote]", "pipeline=[echo]",
         f"server.port={cluster['http']}", "server.proxy_location=HeadOnly", "server.http_proxy=ray",
         "++model.echo_remote.deployment.engine.ray_actor_options.resources={node2: 1}"],
        cwd=copy, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200, 240, "the app became ready",
              launcher)
        shutil.rmtree(copy.parent)  # the driver's copy of the code is gone from here on

        body = {"model_id": REMOTE, "input": "from node 2"}
        assert httpx.post(f"{url}/v1/infer", json=body, timeout=30).json()["output"] == "from node 2"
        assert ray_state(cluster, NODE_OF_ENGINE) == "True"

        # a new replica of the engine imports everything again: only the shipped code is left
        assert ray_state(cluster, KILL_ENGINE) == "1"
        answer = until(lambda: (r := httpx.post(f"{url}/v1/infer", json=body, timeout=30)).status_code == 200 and r,
                       120, "a replacement engine replica answered")
        assert answer.json()["output"] == "from node 2"
        assert ray_state(cluster, NODE_OF_ENGINE) == "True"
    finally:
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, out[-3000:]


def test_serve_deploy_of_the_exported_config_serves_the_same_models(cluster):
    base = cluster["base"]
    out = base / "serve.yaml"
    zipped = base / "mmserve.zip"
    subprocess.run([sys.executable, "-m", "apps.export", "model=[echo,echo_remote]", "pipeline=[echo]",
                    f"server.port={cluster['http']}", "server.proxy_location=HeadOnly",
                    "server.app_name=exported", "--out", str(out), "--package", str(zipped),
                    "--working-dir", f"file://{zipped}"],
                   cwd=PROJECT_ROOT, check=True, capture_output=True)
    assert out.with_name("serve.rayservice.yaml").exists()
    deployed = subprocess.run([SERVE, "deploy", str(out), "--address", cluster["dashboard"]],
                              env=cluster["env"], cwd=base, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = f"http://127.0.0.1:{cluster['http']}"
    until(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200, 240, "the exported app became ready")
    models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert models == {"echo", REMOTE}
    for model_id in models:
        r = httpx.post(f"{url}/v1/infer", json={"model_id": model_id, "input": [1, 2]}, timeout=30)
        assert r.json()["output"] == [1, 2]
