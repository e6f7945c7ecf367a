"""What tracing costs: CPU time per request in each process, tracing off and on.

Serves the model on a local Ray once per side and round, in alternating order (off/on, then
on/off), with ``server.tracing_endpoint`` pointing at a local OTLP/HTTP sink (which answers
200 and keeps nothing) on the traced side; sends ``--warmup`` then ``--requests`` sequential
requests, and reads the CPU time (user + system) of every process of the machine before and
after, grouped by what the process is (the ingress, an engine's or a node's replica, vLLM's
engine core processes, the rest of Ray). Prints each group's CPU milliseconds per request,
the median over rounds of each side, and on/off. CPU time is steadier here than throughput.

``python -m benchmarks.tracing_cost [--rounds 3] [--requests 200] [overrides...]``; default
overrides: echo with its engine in a deployment of its own. For the text default:
``--body chat 'model=[tiny_llama]' 'pipeline=[text]'``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODIES = {
    "infer": ("/v1/infer", lambda model: {"model_id": model, "input": "hello"}),
    "chat": ("/v1/chat/completions", lambda model: {
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
        "temperature": 0, "ignore_eos": True}),
}


class Sink(BaseHTTPRequestHandler):
    exports = 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Sink.exports += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def group_of(cmdline: str) -> str | None:
    """What a process is, by the title Ray and vLLM give it (None: not part of the serving)."""
    if "ServeReplica:" in cmdline:
        app = cmdline.split("ServeReplica:", 1)[1].split(":", 1)[0]
        if "." not in app:
            return "ingress"
        return app.rsplit(".", 1)[1] + " replica"  # engine, preprocess, postprocess
    if "VLLM" in cmdline or "CoreHost" in cmdline:
        return "vLLM engine core"
    if "ray" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline or "haproxy" in cmdline:
        return "Ray, Serve, HAProxy"
    return None


def cpu_by_group() -> dict[str, float]:
    import psutil

    out: dict[str, float] = defaultdict(float)
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            group = group_of(cmd)
            if group is not None and p.pid != psutil.Process().pid:
                t = p.info["cpu_times"]
                out[group] += t.user + t.system
        except (psutil.Error, TypeError):
            continue
    return out


def run_side(overrides: list[str], traced: bool, sink_url: str, body: str, warmup: int, n: int) -> dict[str, float]:
    import httpx

    from apps.config import compose
    from apps.serving import free_port, served

    extra = [f"server.tracing_endpoint={sink_url}"] if traced else []
    cfg = compose([*overrides, f"server.port={free_port()}", *extra])
    model = next(iter(cfg.model.values())).model_id
    path, make = BODIES[body]
    with served(cfg, num_cpus=2, logging_level="ERROR", log_to_driver=False) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(warmup):
                assert http.post(path, json=make(model)).status_code == 200
            time.sleep(6)  # the warm-up's spans exported (the SDK's batch interval is 5 s)
            before = cpu_by_group()
            for _ in range(n):
                r = http.post(path, json=make(model))
                assert r.status_code == 200, r.text
                assert ("x-trace-id" in r.headers) == traced
            time.sleep(6)  # and these requests' spans, whose export is part of the cost
            after = cpu_by_group()
    return {g: (after[g] - before.get(g, 0.0)) / n * 1000 for g in after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--body", choices=list(BODIES), default="infer")
    ap.add_argument("overrides", nargs="*", default=["model=[echo_remote]", "pipeline=[echo]"])
    args = ap.parse_args()

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{sink.server_port}/v1/traces"
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for traced in ((False, True) if r % 2 == 0 else (True, False)):
            got = run_side(args.overrides, traced, url, args.body, args.warmup, args.requests)
            results[traced].append(got)
            print(f"round {r + 1} tracing {'on ' if traced else 'off'}: "
                  + ", ".join(f"{g} {v:.2f}" for g, v in sorted(got.items())) + " ms CPU/request", flush=True)
    print(f"\nCPU ms per request, median of {args.rounds} rounds ({args.requests} requests each; "
          f"{Sink.exports} exports received):")
    groups = sorted({g for side in results.values() for got in side for g in got})
    print(f"{'process':24} {'off':>8} {'on':>8} {'on/off':>7}")
    for g in [*groups, "all"]:
        off = statistics.median(sum(x.values()) if g == "all" else x.get(g, 0.0) for x in results[False])
        on = statistics.median(sum(x.values()) if g == "all" else x.get(g, 0.0) for x in results[True])
        print(f"{g:24} {off:8.2f} {on:8.2f} {on / off if off else float('nan'):7.2f}")
    sink.shutdown()


if __name__ == "__main__":
    main()
