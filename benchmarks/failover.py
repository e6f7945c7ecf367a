"""Losing an ingress replica under load, as clients see it.

Starts the launcher (``python -m apps.launch`` with the given Hydra overrides, echo by
default) with ``deployment.ingress.num_replicas`` replicas on a free port, sends ``/v1/infer``
from 8 clients, SIGKILLs one ingress replica's process (as a crash or the OOM killer would),
keeps the load on for ``--after`` seconds, and prints what the clients got per half second
after the kill: the answers by status (or the connection error), the slowest, the first 200.

``python -m benchmarks.failover --replicas 2 [--model echo] [--after 25] [overrides...]``;
``--replicas 1`` is the single point of failure it is compared with. For a vLLM model name it
with ``--model`` and select it in the overrides (``'model=[tiny_llama]' 'pipeline=[text]'``).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--model", default="echo")
    ap.add_argument("--after", type=float, default=25.0, help="seconds of load after the kill")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("overrides", nargs="*", default=["model=[echo]", "pipeline=[echo]"])
    args = ap.parse_args()

    import httpx

    from apps.serving import free_port
    from benchmarks.startup import stop_launcher
    from core import cpus

    port = free_port()
    log = open(f"/tmp/mmserve-failover-{port}.log", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "apps.launch", *args.overrides, f"server.port={port}",
                                 f"deployment.ingress.num_replicas={args.replicas}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    body = {"model_id": args.model, "input": "hi"}
    if args.model != "echo":
        body["params"] = {"max_tokens": 8}
    try:
        began = time.monotonic()
        while True:  # the launcher's own readiness, polled
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if launcher.poll() is not None or time.monotonic() - began > 900:
                raise SystemExit(f"not ready; the launcher's output: {log.name}")
            time.sleep(0.5)
        events: list[tuple[float, float, str]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        out = str(c.post(f"{url}/v1/infer", json=body).status_code)
                    except httpx.HTTPError as err:
                        out = type(err).__name__
                    events.append((t0, time.monotonic() - t0, out))

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(5)  # load on every replica before the kill
        victim = cpus.processes("ray::ServeReplica:mmserve:ingress", under=launcher.pid)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(args.after)  # the window measured after the kill
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop_launcher(launcher)
    after = [(t0, latency, out) for t0, latency, out in events if t0 + latency > killed_at]
    by_half = collections.defaultdict(collections.Counter)
    slowest: dict[float, float] = collections.defaultdict(float)
    for t0, latency, out in after:
        b = max(0.0, round((t0 - killed_at) * 2) / 2)
        by_half[b][out] += 1
        slowest[b] = max(slowest[b], latency)
    print(f"{args.replicas} ingress replica(s), {args.model}: after the kill (s), answers, slowest (s)")
    for b in sorted(by_half):
        print(f"{b:6.1f}  {dict(by_half[b])}  {slowest[b]:.2f}")
    first = min((t0 + latency for t0, latency, out in after if out == "200"), default=None)
    print(f"first 200 {'never' if first is None else f'{first - killed_at:.2f} s'} after the kill; "
          f"not 200: {dict(collections.Counter(out for _, _, out in after if out != '200'))}; "
          f"slowest {max((latency for _, latency, _ in after), default=0):.2f} s")
    print(f"launcher output: {log.name}")


if __name__ == "__main__":
    main()
