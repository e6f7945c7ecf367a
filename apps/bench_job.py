"""One sweep job of ``apps.bench``: validate, serve, measure, record.

Each job:

1. validates the served config and the ``load``/``bench`` sections; an invalid one is recorded
   as ``status: invalid`` with every problem, and nothing starts;
2. serves it through :func:`apps.serving.served`: on a Ray of its own (the basic launcher runs
   the jobs one after the other in this process, each on a fresh local Ray, so that no job
   inherits another's processes or ``server.http_proxy``/``serve_env``), or in the Ray it runs
   in (the Ray launcher), under an application name and route prefix of its own
   (``<app_name>-job<N>``, ``/job<N>``) so that jobs running at the same time do not collide
   in the one Serve instance of a cluster;
3. drives load (:func:`apps.loadgen.run_load`: warm-up, then the measured window);
4. tears down (deletes its application; stops the Ray it started) and writes ``result.json``
   into its Hydra job directory.

A job that fails (deployment failed, an exception) is recorded as ``status: failed`` with the
error, and the sweep goes on.

This is a module of its own, not part of ``apps.bench``, because ``python -m apps.bench`` runs
that file as ``__main__``: a Ray launcher pickles the task function, which should find this
module by name on the workers, and Hydra instantiates :class:`SweepSummary` by name.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from apps.config import to_plain
from core.validate import ConfigError

logger = logging.getLogger("mmserve.bench")


def run_job(dcfg: DictConfig, num: int, overrides: list[str], out_dir: Path) -> dict:
    """Validate, serve, measure and record one configuration; never raises but on SIGINT or
    SIGTERM (after tearing down and recording the job as interrupted)."""
    from apps import serving
    from apps.bench_config import split_bench_config

    result: dict[str, Any] = {"job": num, "status": "ok", "overrides": overrides, "error": None, "problems": [],
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
        raise SystemExit(1) from None
    except Exception as err:  # recorded in the job's result; the sweep goes on
        logger.exception("job %d failed", num)
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
    return _write(out_dir, result)


def measure(app, load, num: int) -> dict:
    """Serve ``app`` as job ``num``'s application, drive ``load`` at it, tear down.

    Returns ``model_id``, ``deploy_s`` (from deploying to running, Ray's start excluded) and
    ``metrics`` (a LoadResult plus ``error_rate``). Raises whatever serving or the load raised
    (RuntimeError: the app failed to deploy; ShutdownRequested: a signal).
    """
    import asyncio

    from apps import serving
    from apps.bench_config import driven_model
    from apps.loadgen import run_load

    model_id, request = driven_model(app, load)
    name = f"{app.server.app_name}-job{num}"
    prefix = f"{app.server.route_prefix.rstrip('/')}/job{num}"
    # replicas' access logs would bury the progress bar: they stay in Ray's log files
    with serving.ray_serve(app.server, fits=app, log_to_driver=False, handle_signals=True) as session:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Connecting to existing Serve app"...
        t0 = time.perf_counter()
        with serving.served(app, session=session, app_name=name, route_prefix=prefix) as server:
            deploy_s = time.perf_counter() - t0
            url = f"{server.url}/v1/infer"
            logger.info("job %d: %s ready in %.1fs; load: %s", num, name, deploy_s, url)
            res = asyncio.run(run_load(
                url, {"model_id": model_id, **request.body}, concurrency=load.concurrency,
                duration_s=load.duration_s, warmup_s=load.warmup_s,
                rate=load.rate if load.mode == "open" else None, stream=request.stream,
                timeout_s=load.timeout_s, progress=load.progress))
    metrics = res.as_dict()
    metrics["error_rate"] = res.errors / res.requests if res.requests else None
    logger.info("job %d: %s", num, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                             if isinstance(v, float) and not math.isnan(v)))
    return {"model_id": model_id, "deploy_s": round(deploy_s, 2), "metrics": metrics}


def _write(out_dir: Path, result: dict) -> dict:
    from apps.bench_report import RESULT_FILE, finite

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).write_text(json.dumps(finite(result), indent=2) + "\n")
    return result


class SweepSummary(Callback):
    """``hydra.callbacks`` entry of ``conf/bench.yaml``: when a multirun ends, summarize the
    sweep directory (:func:`apps.bench_report.report`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from apps.bench_report import report

        report(Path(str(config.hydra.sweep.dir)))
