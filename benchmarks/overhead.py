"""The framework's own overhead: /v1/infer through the echo pipeline vs a minimal Serve app.

One Ray session, one load client, each app deployed alone in turn:

- ``minimal``: a single FastAPI deployment that parses the JSON body and returns its input;
- ``inline``: mmserve's full echo pipeline (ingress → router → preprocess → engine →
  postprocess) with every node in the ingress replica (``placement: inline``, the echo default);
- ``engine``: the engine in its own deployment (``placement: engine``, one handle hop);
- ``split``: every node its own deployment (``placement: split``, the naive chain).

A variant named with ``-nometrics`` (``inline-nometrics``) is the same with ``server.metrics:
false``: nothing recorded, no ``/metrics``. With ``--rounds N`` the variants run in turn N
times and the table gives each one's median.

``python -m benchmarks.overhead [-c 32] [-d 15]`` prints a table and the ratios to ``minimal``;
``python -m benchmarks.overhead --variants inline,inline-nometrics --rounds 3`` what metrics cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from fastapi import Request  # at module level: FastAPI resolves the string annotation here

PORT = 8011


def minimal_app():
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress(app)
    class Minimal:
        @app.post("/v1/infer")
        async def infer(self, request: Request):
            body = await request.json()
            return {"model_id": body["model_id"], "output": body["input"], "finish_reason": "stop"}

    return Minimal.bind()


def mmserve_config(placement: str, http_proxy: str, metrics: bool = True):
    from apps.config import compose

    return compose(["model=echo", f"server.port={PORT}", f"server.http_proxy={http_proxy}",
                    f"server.metrics={str(metrics).lower()}",
                    f"++model.echo.deployment.placement={placement}",
                    "++model.echo.deployment.engine.ray_actor_options.num_cpus=0",
                    "++model.echo.deployment.engine.max_ongoing_requests=1000",
                    "++model.echo.deployment.node.max_ongoing_requests=1000"])


def measure(name: str, session, args) -> dict:
    """Deploy variant ``name`` alone into ``session``, drive it, delete it."""
    from apps.loadgen import run_load
    from apps.serving import served

    t0 = time.perf_counter()
    if name == "minimal":
        from apps.builder import Target

        app = session.deployed([Target("bench", minimal_app(), "/")])
    else:
        app = served(mmserve_config(name.removesuffix("-nometrics"), args.http_proxy,
                                    metrics=not name.endswith("-nometrics")),
                     session=session, app_name="bench")
    with app as deployed:
        deploy_s = time.perf_counter() - t0
        res = asyncio.run(run_load(f"{deployed.url}/v1/infer", {"model_id": "echo", "input": "hello world"},
                                   concurrency=args.concurrency, duration_s=args.duration,
                                   warmup_s=args.warmup))
        scrape_ms = None if name == "minimal" or name.endswith("-nometrics") else scrape_time_ms(deployed.url)
    row = {"app": name, "deploy_s": round(deploy_s, 1), "scrape_ms": scrape_ms, **res.as_dict()}
    print(json.dumps(row), flush=True)
    return row


def scrape_time_ms(url: str, times: int = 5) -> float:
    """Median time of one ``GET /metrics`` (every replica read and merged), after the load."""
    import statistics

    import httpx

    took = []
    with httpx.Client(timeout=30) as client:
        for _ in range(times):
            t = time.perf_counter()
            client.get(f"{url}/metrics").raise_for_status()
            took.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(took), 1)


def median_row(rows: list[dict]) -> dict:
    import statistics

    out = dict(rows[0])
    for key in ("rps", "p50_ms", "p99_ms"):
        out[key] = statistics.median(r[key] for r in rows)
    out["all_rps"] = [round(r["rps"], 1) for r in rows]
    out["statuses"] = {k: sum(r["statuses"].get(k, 0) for r in rows)
                       for k in {k for r in rows for k in r["statuses"]}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=15.0)
    ap.add_argument("-w", "--warmup", type=float, default=3.0)
    ap.add_argument("--variants", default="minimal,inline,engine,split",
                    help="apps to compare; a -nometrics suffix turns metrics off (inline-nometrics)")
    ap.add_argument("--rounds", type=int, default=1, help="run the variants in turn this many times")
    ap.add_argument("--http-proxy", default="haproxy", choices=["haproxy", "ray"],
                    help="Serve's HTTP proxy mode for every app (server.http_proxy)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from apps.serving import ray_serve

    # the server side of the served config (serve_env included), for the one Ray of the run
    server = mmserve_config("inline", args.http_proxy).server
    with ray_serve(server, logging_level="ERROR", log_to_driver=False) as session:
        names = args.variants.split(",")
        runs = [measure(name, session, args) for _ in range(args.rounds) for name in names]

    rows = [median_row([r for r in runs if r["app"] == name]) for name in names]
    base = next((r for r in rows if r["app"] == "minimal"), rows[0])
    table = Table(title=f"/v1/infer at concurrency {args.concurrency}, {args.duration:g}s each, "
                        f"median of {args.rounds} round(s) ({os.cpu_count()} CPUs, client on the same machine)")
    for col in ("app", "req/s", f"vs {base['app']}", "p50 ms", "p99 ms", "errors", "each round", "GET /metrics ms"):
        table.add_column(col)
    for r in rows:
        errors = sum(v for k, v in r["statuses"].items() if k != "200")
        table.add_row(r["app"], f"{r['rps']:.1f}", f"{r['rps'] / base['rps']:.2f}",
                      f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(errors),
                      " ".join(map(str, r["all_rps"])), str(r["scrape_ms"] or ""))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
