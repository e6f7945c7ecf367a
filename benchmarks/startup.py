"""The first minute: how long after ``python -m apps.launch`` each thing answers.

Starts the launcher (``python -m apps.launch`` with the given Hydra overrides, the embedded
default with none) on a free port, and polls it every ``--period`` seconds: when ``/health``
first answers, when each model is first ``ready`` in ``GET /v1/models`` (or ``failed``), and
when ``/ready`` first says every model is. Then stops the launcher (SIGINT) and prints one
line per event, seconds from the launcher's start.

``python -m benchmarks.startup [--cold] [--timeout 600] [--period 0.5] [overrides...]``

``--cold`` gives the launcher empty caches (``MMSERVE_CACHE_DIR``, where the generated
checkpoints are written, and ``VLLM_CACHE_ROOT``, vLLM's compiled graphs, both in a new
temporary directory; the user's own are left alone), but for what set-up writes there (vLLM's
options, ``scripts/setup_env.sh``): what a newcomer's first ``make run`` waits for after set-up. Without it, the caches are used as they are (a warm start). ``--json`` prints the events
as JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="empty the generated checkpoints' cache first")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--period", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import httpx

    from apps.serving import free_port

    env = dict(os.environ)
    if args.cold:
        fresh = tempfile.mkdtemp(prefix="mmserve-cold-")
        env.update(MMSERVE_CACHE_DIR=f"{fresh}/mmserve", VLLM_CACHE_ROOT=f"{fresh}/vllm")
        # what set-up leaves there (scripts/setup_env.sh): vLLM's options, read once per vLLM
        subprocess.run([sys.executable, "-c", "from engines.vllm_options import definitions; definitions()"],
                       env=env, check=True, capture_output=True)
    port = free_port()
    log = open(f"/tmp/mmserve-startup-{port}.log", "w")
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "apps.launch", f"server.port={port}", *args.overrides],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    events: dict[str, float] = {}

    def seen(what: str) -> None:
        if what not in events:
            events[what] = round(time.monotonic() - began, 1)
            print(f"{events[what]:7.1f} s  {what}", flush=True)

    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            while time.monotonic() - began < args.timeout and proc.poll() is None:
                try:
                    if http.get("/health").status_code == 200:
                        seen("/health")
                    for m in http.get("/v1/models").json()["data"]:
                        if m["status"] in ("ready", "failed") and not m.get("parent"):
                            seen(f"{m['id']} {m['status']}")
                    if http.get("/ready").status_code == 200:
                        seen("/ready (every model)")
                        took = {m["id"]: m.get("ready_after_s") for m in http.get("/v1/models").json()["data"]
                                if not m.get("parent")}  # an adapter is its base model's
                        print("each model ready after (s, from the ingress's start):",
                              ", ".join(f"{m} {s}" for m, s in took.items()), flush=True)
                        events.update({f"{m} (ingress)": s for m, s in took.items() if s is not None})
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(args.period)
    finally:
        stop_launcher(proc)
        log.close()
        if args.cold:
            shutil.rmtree(fresh, ignore_errors=True)
    if proc.returncode not in (0, None) and "/ready (every model)" not in events:
        print(f"launcher exited {proc.returncode}; its output: {log.name}")
    print(f"launcher output: {log.name}")
    if args.json:
        print(json.dumps(events))


def stop_launcher(proc: subprocess.Popen, grace_s: float = 120.0) -> None:
    """Stop a launcher started in a session of its own as Ctrl-C would (it drains and stops its
    Ray), and kill its whole group if it has not within ``grace_s``."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
