"""Start (or join) Ray, deploy a validated config, wait until it is ready, and shut down cleanly."""

from __future__ import annotations

import glob
import logging
import os
import signal
import threading
import time

from core.config import AppConfig
from core.validate import check_resources

logger = logging.getLogger("mmserve.launch")


def local_gpu_count() -> int:
    """GPUs Ray would see on this machine, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def connect_ray(cfg: AppConfig, log_to_driver: bool = True) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start a local one, after checking that the
    deployments fit in it. Raises ConfigError (disconnecting first) if they do not.
    ``log_to_driver=False`` leaves the replicas' logs in Ray's log files only."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        check_resources(cfg, float(os.cpu_count() or 1), float(local_gpu_count()))
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=log_to_driver)
        install_signal_handlers()
        return
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    install_signal_handlers()
    res = ray.cluster_resources()
    try:
        check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))
    except Exception:
        ray.shutdown()
        raise


def deploy(cfg: AppConfig) -> None:
    """Start Serve's HTTP proxy on the configured address, deploy, and wait until running.

    Raises:
        RuntimeError: the application failed to deploy, or was not ready in ``ready_timeout_s``.
    """
    from ray import serve
    from ray.serve.api import _run
    from ray.serve.schema import ApplicationStatus

    from pipelines.builder import build_app

    serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
    name = cfg.server.app_name
    _run(build_app(cfg), name=name, route_prefix=cfg.server.route_prefix, _blocking=False)
    deadline = time.monotonic() + cfg.server.ready_timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"application {name!r} failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"application {name!r} not ready after {cfg.server.ready_timeout_s}s "
                               f"(status {app.status if app else 'unknown'}: {app.message if app else ''})")
        time.sleep(0.5)  # polling Serve's own status, not standing in for readiness


class ShutdownRequested(Exception):
    """SIGINT or SIGTERM arrived: unwind to the launcher's clean shutdown."""


def _request_shutdown(signum, frame):
    raise ShutdownRequested(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    """Make SIGINT and SIGTERM raise :class:`ShutdownRequested` in the main thread.

    Called again after ``ray.init``, which installs a SIGTERM handler of its own that exits.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _request_shutdown)


def wait_forever() -> None:
    """Block until a signal handler raises :class:`ShutdownRequested`."""
    threading.Event().wait()


def shutdown(cfg: AppConfig) -> None:
    """Delete our application and stop Serve (and Ray, when we started it).

    Further SIGINT/SIGTERM are ignored meanwhile: a supervisor that signals twice must not
    cut the drain short.
    """
    import ray
    from ray import serve

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)

    serve.delete(cfg.server.app_name)  # drains in-flight requests within each grace period
    if not os.environ.get("RAY_ADDRESS"):  # a shared cluster keeps its Serve instance
        serve.shutdown()
    ray.shutdown()
