"""A real two-node Ray cluster on this machine (a head, and a second raylet with its own HOME,
temporary directory and a custom resource), joined with token authentication as a user's
launcher on another machine would join it:

- the launcher, run from a copy of the project that is deleted once it has deployed, ships the
  code in the job's runtime environment: an engine pinned to the second node runs there, and
  after the copy is gone a replacement of that replica still starts and answers;
- then, under steady load on that model, ``python -m apps.launch --update`` adds a model (from
  the shipped code alone) and removes another in place: no failed request, no replica of the
  others restarted, the removed model's requests in flight answered before it goes;
- ``python -m apps.export`` writes a Serve config that ``serve deploy`` serves on that cluster,
  and deployed again with other models, updates it in place just as well.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from apps.serving import PROJECT_ROOT, free_port
from tests.support import metric_families

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


REPLICAS = """
import json, ray
from ray.util.state import list_actors
ray.init(logging_level="ERROR")
print(json.dumps(sorted([a.class_name, a.actor_id] for a in list_actors(
    filters=[("state", "=", "ALIVE")], limit=1000) if a.class_name.startswith("ServeReplica:"))))
"""

APPS = """
from ray import serve
import ray
ray.init(logging_level="ERROR")
print("apps:" + ",".join(sorted(serve.status().applications)))
"""


def replicas(cluster, app: str, *deployments: str) -> list:
    """[class name, actor id] of every live replica of these deployments of ``app``'s
    applications (a replica's class is ``ServeReplica:<application>:<deployment>``)."""
    import json

    return [r for r in json.loads(ray_state(cluster, REPLICAS))
            if r[0].split(":")[1].split(".")[0] == app and r[0].split(":")[-1] in deployments]


def serve_apps(cluster) -> set[str]:
    return set(filter(None, ray_state(cluster, APPS).removeprefix("apps:").split(",")))


class SteadyLoad:
    """One client sending ``body`` back to back in a thread, recording every status code."""

    def __init__(self, url: str, body: dict) -> None:
        self.codes: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)

    def _run(self, url: str, body: dict) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{url}/v1/infer", json=body)
                    self.codes.append(r.status_code)
                    if r.status_code != 200 or r.json()["output"] != body["input"]:
                        self.errors.append(r.text[:300])
                except httpx.HTTPError as err:
                    self.codes.append(0)
                    self.errors.append(repr(err))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)


def in_flight(url: str, model_id: str) -> float:
    return sum(s.value for f in metric_families(httpx.get(f"{url}/metrics", timeout=10))
               if f.name == "mmserve_requests_in_flight" for s in f.samples if s.labels["model_id"] == model_id)


def test_a_launcher_from_a_copy_of_the_code_serves_from_node_2_and_updates_in_place_under_load(cluster):
    # A: echo-remote, its engine pinned to the second node; C: echo in an engine deployment of
    # its own, so that removing it deletes one. The launcher runs from a copy of the project
    # that is deleted once it is ready: what runs from then on (a replacement replica, the
    # models an update adds) has only the code the launcher shipped.
    copy = cluster["base"] / "copy" / "mmserve"
    shutil.copytree(PROJECT_ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "multirun", "__pycache__", ".hypothesis", ".pytest_cache", ".mypy_cache"))
    url = f"http://127.0.0.1:{cluster['http']}"
    common = ["pipeline=[echo]", f"server.port={cluster['http']}", "server.proxy_location=HeadOnly",
              "server.http_proxy=ray", "server.app_name=live",
              "++model.echo_remote.deployment.engine.ray_actor_options.resources={node2: 1}"]
    c_placed = ["++model.echo.deployment.placement=engine",
                "++model.echo.deployment.engine.ray_actor_options.num_cpus=0"]
    log_path = cluster["base"] / "live-launcher.log"
    log = log_path.open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "apps.launch", "model=[echo_remote,echo]", *common, *c_placed],
                                cwd=copy, env=cluster["env"], stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200, 240, "the app became ready", launcher)
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

        kept = replicas(cluster, "live", "ingress", f"{REMOTE}.engine")
        assert len(kept) == 2
        with SteadyLoad(url, {"model_id": REMOTE, "input": "steady"}) as load, ThreadPoolExecutor(3) as pool:
            slow = [pool.submit(httpx.post, f"{url}/v1/infer", timeout=60, json={
                "model_id": "echo", "input": f"in flight {i}", "params": {"delay_s": 4}}) for i in range(3)]
            until(lambda: in_flight(url, "echo") == 3, 30, "three requests to C in flight")
            update = subprocess.run([sys.executable, "-m", "apps.launch", "--update", "model=[echo_remote,echo_split]",
                                     *common], cwd=PROJECT_ROOT, env=cluster["env"], capture_output=True,
                                    text=True, timeout=300)
            assert update.returncode == 0, update.stdout[-2000:] + update.stderr[-3000:]
            answer = json_tail(update.stdout)
            assert (answer["added"], answer["removed"], answer["served"]) == (["echo-split"], ["echo"],
                                                                              ["echo-remote", "echo-split"])
            # the update returned once C's requests were answered: the ingress drained them first
            assert all(f.done() for f in slow)
            for i, f in enumerate(slow):
                assert f.result().status_code == 200 and f.result().json()["output"] == f"in flight {i}"
            added = httpx.post(f"{url}/v1/infer", json={"model_id": "echo-split", "input": [1, 2]}, timeout=30)
            assert added.status_code == 200 and added.json()["output"] == [1, 2]
            gone = httpx.post(f"{url}/v1/infer", json={"model_id": "echo", "input": "late"}, timeout=30)
            assert gone.status_code == 404 and "served: echo-remote, echo-split" in gone.json()["error"]["message"]
            ids = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
            assert ids == {REMOTE, "echo-split"}
            until(lambda: len(load.codes) > len(slow) * 10, 60, "the load ran on after the update")
        assert load.codes and not load.errors, load.errors[:5]
        assert replicas(cluster, "live", "ingress", f"{REMOTE}.engine") == kept  # nothing of A restarted
        apps = serve_apps(cluster)
        assert {"live", "live.echo-remote.engine", "live.echo-split.engine"} <= apps
        assert "live.echo.engine" not in apps

        # an update that would change the server is refused; the launcher keeps serving
        refused = subprocess.run([sys.executable, "-m", "apps.launch", "--update", "model=[echo_remote]", *common,
                                  "server.max_body_bytes=1000"], cwd=PROJECT_ROOT, env=cluster["env"],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "server: an update changes models only" in refused.stdout
        assert httpx.post(f"{url}/v1/infer", json={"model_id": "echo-split", "input": 1}, timeout=30).status_code == 200
    except (AssertionError, subprocess.TimeoutExpired) as err:
        raise AssertionError(f"{err}\nthe launcher's log ends:\n{log_path.read_text()[-4000:]}") from err
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=120)
        log.close()
    assert launcher.returncode == 0, log_path.read_text()[-3000:]
    left = serve_apps(cluster)
    assert not [a for a in left if a.startswith("live")], left  # the added model's too


def json_tail(stdout: str) -> dict:
    """The JSON object a command printed last."""
    import json

    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


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

    # exported again with echo (inline, in the ingress) out and echo-split (three deployments)
    # in, and deployed again: Serve changes the ingress's models in place and adds the new
    # applications; the ingress's and echo-remote's replicas keep running
    kept = replicas(cluster, "exported", "ingress", f"{REMOTE}.engine")
    assert len(kept) == 2
    again = base / "serve2.yaml"
    subprocess.run([sys.executable, "-m", "apps.export", "model=[echo_remote,echo_split]", "pipeline=[echo]",
                    f"server.port={cluster['http']}", "server.proxy_location=HeadOnly",
                    "server.app_name=exported", "--out", str(again), "--working-dir", f"file://{zipped}"],
                   cwd=PROJECT_ROOT, check=True, capture_output=True)
    deployed = subprocess.run([SERVE, "deploy", str(again), "--address", cluster["dashboard"]],
                              env=cluster["env"], cwd=base, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    until(lambda: httpx.post(f"{url}/v1/infer", json={"model_id": "echo-split", "input": 3},
                             timeout=30).status_code == 200, 180, "the added model answered")
    gone = httpx.post(f"{url}/v1/infer", json={"model_id": "echo", "input": 3}, timeout=30)
    assert gone.status_code == 404 and "served: echo-remote, echo-split" in gone.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/infer", json={"model_id": REMOTE, "input": 3}, timeout=30).json()["output"] == 3
    assert replicas(cluster, "exported", "ingress", f"{REMOTE}.engine") == kept
