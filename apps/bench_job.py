"""One sweep job of ``apps.bench``: validate, deploy, measure, record; and the Ray that the
jobs of one process share.

Each job:

1. validates the served config and the ``load``/``bench`` sections; an invalid one is recorded
   as ``status: invalid`` with every problem, and nothing starts;
2. starts Ray, or reuses the Ray this process started for an earlier job (the basic launcher
   runs every job in this process), or the one it runs in (the Ray launcher);
3. deploys under an application name and route prefix of its own (``<app_name>-job<N>``,
   ``/job<N>``), so that jobs a Ray launcher runs at the same time do not collide in the one
   Serve instance of a cluster, and waits until Serve reports it running;
4. drives load (:func:`apps.loadgen.run_load`: warm-up, then the measured window);
5. writes ``result.json`` into its Hydra job directory and deletes the application.

A job that fails (deployment failed, an exception) is recorded as ``status: failed`` with the
error, Ray is restarted for the next job, and the sweep goes on.

This is a module of its own, not part of ``apps.bench``, because ``python -m apps.bench`` runs
that file as ``__main__``: the callback Hydra instantiates (``apps.bench_job.SweepSummary``)
must see the same Ray state as the jobs, and a Ray launcher pickles the task function, which
should find this module by name on the workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from apps.config import to_plain
from core.validate import ConfigError

logger = logging.getLogger("mmserve.bench")

# The Ray this process connected to (basic launcher: one Ray for the whole sweep), with the
# Serve HTTP address it started; None when Ray was started by someone else (a Ray launcher's
# job runs inside a Ray task) or not at all.
_owned: dict | None = None


def run_job(dcfg: DictConfig, num: int, overrides: list[str], out_dir: Path) -> dict:
    """Validate, deploy, measure and record one configuration; never raises but on SIGINT or
    SIGTERM (after recording the job as interrupted and stopping Ray)."""
    from apps import serving
    from apps.bench_config import split_bench_config

    result = {"job": num, "status": "ok", "overrides": overrides, "error": None, "problems": [],
              "model_id": None, "load": None, "deploy_s": None, "metrics": {}, "score": None}
    try:
        app, load, bench = split_bench_config(to_plain(dcfg))
        result["load"] = load.model_dump()
        result.update(measure(app, load, num))
        result["score"] = bench.goal.score(result["metrics"])
    except ConfigError as err:  # the config, or more resources than the cluster has: nothing started
        result.update(status="invalid", error=str(err), problems=[list(p) for p in err.problems])
        logger.error("job %d: %s", num, err)
    except serving.ShutdownRequested as sig:
        result.update(status="interrupted", error=f"{sig} received")
        _write(out_dir, result)
        close_ray()
        raise SystemExit(1) from None
    except Exception as err:  # recorded in the job's result; the sweep goes on
        logger.exception("job %d failed", num)
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
        close_ray()  # the next job starts on a fresh Ray
    return _write(out_dir, result)


def measure(app, load, num: int) -> dict:
    """Deploy ``app`` as job ``num``'s application, drive ``load`` at it, delete it.

    Returns ``model_id``, ``deploy_s`` and ``metrics`` (a LoadResult plus ``error_rate``).
    Raises whatever deploying or the load raised (RuntimeError: the app failed to deploy).
    """
    import asyncio

    from apps import serving
    from apps.bench_config import driven_model
    from apps.loadgen import run_load

    served = app.model_copy(deep=True)
    served.server.app_name = f"{app.server.app_name}-job{num}"
    served.server.route_prefix = f"{app.server.route_prefix.rstrip('/')}/job{num}"
    model_id, request = driven_model(app, load)
    host = "127.0.0.1" if served.server.host in ("0.0.0.0", "::") else served.server.host
    url = f"http://{host}:{served.server.port}{served.server.route_prefix}/v1/infer"

    _ensure_ray(served)
    t0 = time.perf_counter()
    try:
        serving.deploy(served)
        deploy_s = time.perf_counter() - t0
        logger.info("job %d: %s ready in %.1fs; load: %s", num, served.server.app_name, deploy_s, url)
        res = asyncio.run(run_load(
            url, {"model_id": model_id, **request.body}, concurrency=load.concurrency,
            duration_s=load.duration_s, warmup_s=load.warmup_s,
            rate=load.rate if load.mode == "open" else None, stream=request.stream,
            timeout_s=load.timeout_s, progress=load.progress))
    finally:
        _delete(served.server.app_name)
    metrics = res.as_dict()
    metrics["error_rate"] = res.errors / res.requests if res.requests else None
    logger.info("job %d: %s", num, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                             if isinstance(v, float) and not math.isnan(v)))
    return {"model_id": model_id, "deploy_s": round(deploy_s, 2), "metrics": metrics}


def _ensure_ray(cfg) -> None:
    """Connect once per process; later jobs check their resources against the same Ray."""
    global _owned
    import ray
    from ray import serve

    from apps import serving
    from core.validate import check_resources

    http = (cfg.server.host, cfg.server.port)
    env = serving.serve_env(cfg.server, local=False)
    local = not os.environ.get("RAY_ADDRESS")  # a cluster's Serve is not ours to restart
    if _owned is not None and _owned["env"] != env and local:
        # Serve's processes read their mode when they start: this job needs a fresh local Ray
        logger.info("server.http_proxy %s / serve_env changed: restarting the local Ray", cfg.server.http_proxy)
        close_ray()
    if _owned is not None and _owned["http"] != http and local:
        serve.shutdown()  # this job's proxy listens elsewhere: deploy() starts it again
        _owned["http"] = http
    if ray.is_initialized():
        res = ray.cluster_resources()
        check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))
        return
    serving.connect_ray(cfg, log_to_driver=False)  # replicas' access logs would bury the progress
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Connecting to existing Serve app"...
    _owned = {"http": http, "env": env}


def _delete(app_name: str) -> None:
    """Delete the job's application (waits until its replicas are gone), if Ray is up."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.delete(app_name)


def close_ray() -> None:
    """Stop Serve and Ray if this process started them (and only disconnect from a cluster
    at ``RAY_ADDRESS``): after a failed job, and when the sweep ends."""
    global _owned
    import ray
    from ray import serve

    if _owned is None:
        return
    _owned = None
    try:
        if not os.environ.get("RAY_ADDRESS"):
            serve.shutdown()
    finally:
        ray.shutdown()


def _write(out_dir: Path, result: dict) -> dict:
    from apps.bench_report import RESULT_FILE, finite

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).write_text(json.dumps(finite(result), indent=2) + "\n")
    return result


class SweepSummary(Callback):
    """``hydra.callbacks`` entry of ``conf/bench.yaml``: when a multirun ends, stop the Ray this
    process started and summarize the sweep directory (:func:`apps.bench_report.report`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from apps.bench_report import report

        close_ray()
        report(Path(str(config.hydra.sweep.dir)))
