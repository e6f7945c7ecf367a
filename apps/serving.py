"""Serve a validated config: start or join Ray, deploy, wait until ready, tear down.

:func:`served` is the one way to do it; the launcher, the integration tests, the benchmarks
and the sweeps all use it::

    with served(cfg) as server:
        httpx.post(f"{server.url}/v1/infer", json=...)

It is two halves that callers deploying several applications into one Ray (benchmarks that
compare variants) use apart: :func:`ray_serve` (Ray and Serve's HTTP proxy, for the whole
``with``) and :meth:`RaySession.deployed` (one config's applications).

Ownership decides the tear-down: a Ray this process started is stopped with its Serve
instance; a Ray it joined (``RAY_ADDRESS``, or one already connected, as in a Ray task) keeps
its Serve instance and loses only the applications deployed here.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Iterator

from core import cpus, internals, tracing
from core.config import AppConfig, ServerConfig
from core.validate import ConfigError, check_resources

if TYPE_CHECKING:
    from apps.builder import Target

logger = logging.getLogger("mmserve.launch")


#: the project's root: what a job joining a cluster ships to it (``code_runtime_env``)
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: what never ships (gitignore patterns, as Ray's runtime_env ``excludes`` reads them)
EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
            ".mypy_cache", ".hypothesis", "*.egg-info", "outputs", "multirun", ".cache",
            "node_modules", "*.zip"]


def code_runtime_env(server: ServerConfig) -> dict:
    """The part of a joining job's runtime environment that carries the project to every node
    (Ray's ``working_dir``: uploaded once, unpacked on each node, the replicas' working
    directory and first on their path), or nothing with ``server.ship_code: false``."""
    if not server.ship_code:
        return {}
    return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}


def local_gpu_count() -> int:
    """GPUs Ray would see on this machine, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


# What `server.http_proxy: haproxy` means: Ray Serve's throughput-optimized mode behind HAProxy
# (a C load balancer shipped with ray[serve]), which takes HTTP on server.port and forwards it
# to the ingress replica, which serves HTTP itself. Its tuning (gRPC off between deployments, a
# 5 s drain) is in server.serve_env (conf/server/default.yaml), where it can be changed.
HAPROXY_MODE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

# Fixed ports that mode opens on each node (Ray's defaults: HAProxy's stats page 8404 and
# Prometheus endpoint 9101, the fallback Python proxy 8500). A local Ray gets free ones, so that
# two launchers on one machine (or a launcher and the tests) do not fight over them; one set in
# the environment or in server.serve_env is kept.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


def serve_env(server: ServerConfig, local: bool) -> dict[str, str]:
    """Environment that Serve's controller, proxies and replicas start with for ``server``:
    the tracing variables (the launcher's ``OTEL_*``, ``server.tracing_endpoint``), the
    ``http_proxy`` mode, free ports for a ``local`` Ray's HAProxy, then ``server.serve_env``
    (which the config's defaults fill, and which wins)."""
    # tracing (core.tracing): the launcher's OTEL_* variables, then the config's endpoint
    env: dict[str, str] = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    if server.tracing_endpoint:
        env[tracing.ENDPOINT_ENVS[0]] = server.tracing_endpoint
    if tracing.endpoint(env):  # the protocol mmserve sends, for a backend's own exporter (some default to gRPC)
        env.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    if server.http_proxy == "haproxy":
        env.update(HAPROXY_MODE_ENV)
        if local:
            # server.port is not bound until HAProxy starts, so a free port can be it: CI saw
            # the fallback proxy take server.port and HAProxy then fail to bind it.
            taken = {server.port}
            for k in HAPROXY_PORTS:
                if k not in os.environ and k not in server.serve_env:
                    taken.add(port := free_port(avoid=taken))
                    env[k] = str(port)
    return {**env, **server.serve_env}


# Ports that free_port() hands out: above Ray's worker ports (10002-19999 by default), below
# the ports Serve's replicas take for direct ingress (30000-31000) and below the kernel's
# ephemeral range, so that nothing Ray starts (an outgoing connection, a replica) can take the
# port before the server binds it. CI saw that race when ports came from the ephemeral range.
FREE_PORTS = range(20000, 30000)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_rng = random.SystemRandom()  # not the global generator, which a caller may have seeded


def free_port(avoid: Collection[int] = ()) -> int:
    """A TCP port free on this machine right now and not in ``avoid`` (ports handed out but not
    yet bound), outside the kernel's ephemeral range where it can (otherwise one the kernel
    picks)."""
    try:
        below = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        below = FREE_PORTS.start
    ports = range(FREE_PORTS.start, min(FREE_PORTS.stop, below))
    candidates = [p for p in _rng.sample(ports, min(64, len(ports))) if p not in avoid]
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


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


# --- signals -------------------------------------------------------------------------------

class ShutdownRequested(Exception):
    """SIGINT or SIGTERM arrived: unwind to a clean shutdown."""


def _request_shutdown(signum, frame):
    raise ShutdownRequested(signal.Signals(signum).name)


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal works only there


def install_signal_handlers() -> None:
    """Make SIGINT and SIGTERM raise :class:`ShutdownRequested` in the main thread.

    Installed again after ``ray.init``, which installs a SIGTERM handler of its own that exits.
    """
    if _in_main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _request_shutdown)


def ignore_signals() -> None:
    """Ignore SIGINT and SIGTERM while tearing down: a supervisor that signals twice must not
    cut the drain short."""
    if _in_main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def wait_forever() -> None:
    """Block until a signal handler raises :class:`ShutdownRequested`."""
    threading.Event().wait()


# --- Ray and Serve -------------------------------------------------------------------------

@dataclass(frozen=True)
class Served:
    """An application that is deployed and running."""

    url: str                # base URL, no trailing slash: f"{url}/v1/infer"
    app_name: str
    session: RaySession
    failed: dict[str, str] = field(default_factory=dict)  # model id -> why it did not start


#: what the launcher is told while models start: each model's ``ModelRouter.states`` entry
Progress = Callable[[dict[str, dict]], None]


@dataclass
class RaySession:
    """Ray, connected, with Serve's HTTP proxy started on ``server.host``/``server.port``."""

    server: ServerConfig
    started: bool           # this process started this Ray: tearing down stops it and its Serve
    handles_signals: bool   # SIGINT/SIGTERM raise ShutdownRequested (and are ignored on tear-down)
    model_cpus: set[int] | None = None  # a local Ray kept off these: its data path gets them back

    def url(self, route_prefix: str = "/") -> str:
        """Base URL of an application at ``route_prefix``, without a trailing slash."""
        host = self.server.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{host}:{self.server.port}{route_prefix.rstrip('/')}"

    def check_fits(self, cfg: AppConfig) -> None:
        """Raises ConfigError if ``cfg``'s deployments need more than this Ray has."""
        import ray

        res = ray.cluster_resources()
        check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))

    @contextlib.contextmanager
    def deployed(self, targets: list[Target], *, ready_timeout_s: float = 900.0,
                 on_failure: str = "stop", progress: Progress | None = None) -> Iterator[Served]:
        """Deploy ``targets`` (``apps.builder.Target``; the last one answers HTTP, and names the
        whole): the ingress first, until it answers, then the models' steps (a model's once
        the ingress says it no longer waits its turn, ``server.slow_starts_at_once``), and wait until
        every model is ready or has failed to start (``progress`` is told each model's state meanwhile), yield the last
        as :class:`Served`; afterwards delete it and every application named after it (its
        models' steps, those an :meth:`update` added included), draining requests in flight
        within each deployment's grace period, ready or not.

        ``on_failure``: a model that failed to start stops everything (``stop``: RuntimeError)
        or is reported in ``Served.failed`` while the others are served (``serve_others``).

        Raises:
            RuntimeError: it failed to deploy, a model failed with ``on_failure: stop``, or a
                model was neither ready nor failed within ``ready_timeout_s``.
        """
        import time

        from ray import serve

        main = targets[-1]
        deadline = time.monotonic() + ready_timeout_s
        try:
            # the ingress first, alone: it answers while the models start behind it (together,
            # on 2 cores, its start waited 100 s for the models' imports)
            _run([main], ready_timeout_s)
            ingress = serve.get_app_handle(main.name)
            later = _deploy_due(targets[:-1], ingress.model_states.remote().result(timeout_s=30))
            if self.model_cpus:
                # HAProxy carries every request and chunk: it runs where the models do, and so
                # does its manager, which starts a new haproxy on each reload (one often comes
                # just as the applications turn running)
                cpus.move_with_what_it_starts("ray::HAProxyManager", "haproxy", self.model_cpus,
                                              under=os.getpid())
            failed = wait_for_models(main.name, deadline, progress, later)
            if failed and on_failure == "stop":
                raise RuntimeError("model(s) failed to start: " + "; ".join(f"{m}: {why}" for m, why in failed.items()))
            yield Served(url=self.url(main.route_prefix or "/"), app_name=main.name, session=self, failed=failed)
        finally:
            if self.handles_signals:
                ignore_signals()
            _delete_with_steps(main.name)

    def update(self, old: AppConfig, new: AppConfig, *, app_name: str, route_prefix: str) -> dict[str, list[str]]:
        """Change the running application ``app_name`` from serving ``old`` to ``new`` in
        place: the steps of added or changed models start first (the others' replicas keep
        running: their deployment versions are unchanged, and what Serve applies in place, such
        as ``num_replicas``, is applied); then the ingress's ``user_config`` (its models)
        changes, on its running replicas, which finish a removed model's requests in flight
        before they let it go; last, the removed models' steps are deleted. Returns the model
        ids ``added``, ``changed`` and ``removed``.

        Raises:
            ConfigError: ``new`` changes the ``server`` section or the ingress's deployment
                (that needs a restart).
            RuntimeError: a step failed to deploy or was not running in time, or the ingress
                could not build or start a new model's local steps (what the update started is
                deleted again, and the ingress still serves ``old``).
        """
        from apps.builder import build_targets, route_specs

        changed_keys = (["server"] if old.server != new.server else []) + (
            ["deployment.ingress"] if old.deployment.ingress != new.deployment.ingress else [])
        if changed_keys:
            raise ConfigError([(k, "an update changes models only; this differs from the running "
                                "launcher's (restart the launcher to change it)") for k in changed_keys])
        before = {s.model.model_id: s for s in route_specs(old)}
        after = {s.model.model_id: s for s in route_specs(new)}
        running = set(step_apps_of(app_name))
        targets = build_targets(new, app_name, route_prefix)
        steps, ingress = targets[:-1], targets[-1]
        started = [t.name for t in steps if t.name not in running]
        try:
            _run(steps, new.server.ready_timeout_s)
        except BaseException:
            _delete(started)
            raise
        _run([ingress], new.server.ready_timeout_s)
        if error := _ingress_update_error(app_name):
            # the ingress kept the old models: give it their config back, drop what was started
            _run([build_targets(old, app_name, route_prefix)[-1]], new.server.ready_timeout_s)
            _delete(started)
            raise RuntimeError(f"the ingress could not take the new models ({error}); it still serves "
                               f"{sorted(before)}")
        _delete(sorted(running - {t.name for t in steps}))
        return {"added": sorted(after.keys() - before.keys()), "removed": sorted(before.keys() - after.keys()),
                "changed": sorted(k for k in after.keys() & before.keys() if after[k] != before[k])}


def _ingress_update_error(app_name: str) -> str | None:
    """What the ingress of ``app_name`` says of its last change of models (None: applied)."""
    from ray import serve

    return serve.get_app_handle(app_name).last_update_error.remote().result(timeout_s=60)


def step_apps_of(app_name: str) -> list[str]:
    """The running Serve applications that host steps of ``app_name``'s models."""
    return sorted(n for n in internals.serve_applications() if n.startswith(f"{app_name}."))


#: how often the launcher asks Serve, and then the ingress, how the start-up goes
POLL_S = 0.5


def _run(targets: list[Target], timeout_s: float, wait_for: list[str] | None = None) -> None:
    """Serve's ``run_many`` for ``targets``, then wait until the applications ``wait_for``
    (default: all) run, at most ``timeout_s``. The others go on starting."""
    import time

    from ray import serve

    if not targets:
        return
    names = [t.name for t in targets]
    wait_for = names if wait_for is None else wait_for
    try:
        serve.run_many([serve.RunTarget(target=t.app, name=t.name, route_prefix=t.route_prefix)
                        for t in targets], blocking=False, wait_for_applications_running=False)
    except Exception as err:
        raise RuntimeError(f"application {names[-1]!r} failed to deploy: {err}") from err
    deadline = time.monotonic() + timeout_s
    while True:
        apps = internals.serve_applications()
        states = {n: apps.get(n) for n in wait_for}
        if all(a is not None and a.running for a in states.values()):
            return
        if failed := {n: a for n, a in states.items() if a is not None and a.failed}:
            raise RuntimeError(f"application {names[-1]!r} failed to deploy: "
                               + "; ".join(f"{n}: {a.message}" for n, a in failed.items()))
        if time.monotonic() > deadline:
            detail = "; ".join(f"{n}: {a.status} {a.message}".strip() if a else f"{n}: unknown"
                               for n, a in states.items())
            raise RuntimeError(f"application {names[-1]!r} not ready after {timeout_s:g}s ({detail})")
        time.sleep(POLL_S)


def _deploy_due(targets: list[Target], states: dict[str, dict]) -> list[Target]:
    """Deploy those of ``targets`` whose model no longer waits its turn to start (the
    ingress's ``model_states``); the others, to deploy later."""
    due = [t for t in targets if not states.get(t.model_id or "", {}).get("waiting_turn")]
    if due:
        _run(due, 0.0, wait_for=[])
    return [t for t in targets if t not in due]


def wait_for_models(app_name: str, deadline: float, progress: Progress | None = None,
                    later: list[Target] | None = None) -> dict[str, str]:
    """Wait until every model of the running ingress ``app_name`` is ready or has failed to
    start (``Ingress.model_states``), telling ``progress`` each time, and deploying each of
    ``later`` (a model's steps) once its model's turn to start has come; the failed ones, with
    why.

    Raises:
        RuntimeError: a model was still starting at ``deadline`` (``time.monotonic()``).
    """
    import time

    from ray import serve

    ingress = serve.get_app_handle(app_name)
    later = list(later or [])
    while True:
        states = ingress.model_states.remote().result(timeout_s=30)
        if later:
            later = _deploy_due(later, states)
        if progress is not None:
            progress(states)
        starting = {m: s["detail"] for m, s in states.items() if s["state"] == "starting"}
        if not starting:
            return {m: s["detail"] for m, s in states.items() if s["state"] == "failed"}
        if time.monotonic() > deadline:
            raise RuntimeError("model(s) not ready within server.ready_timeout_s: "
                               + "; ".join(f"{m} ({what})" for m, what in starting.items()))
        time.sleep(POLL_S)


def _delete_with_steps(app_name: str) -> None:
    """Delete ``app_name`` and its models' step applications (if Ray is still up)."""
    import ray

    if ray.is_initialized():
        _delete([app_name, *step_apps_of(app_name)])


def _delete(names: list[str]) -> None:
    """Delete the applications ``names``, the first (the ingress, if it is one) before the
    others, which are deleted at once (each waits for its replicas to drain and stop)."""
    import ray
    from concurrent.futures import ThreadPoolExecutor
    from ray import serve

    if not ray.is_initialized() or not names:
        return
    serve.delete(names[0])
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(serve.delete, names[1:]))


@contextlib.contextmanager
def ray_serve(server: ServerConfig, *, fits: AppConfig | None = None, num_cpus: float | None = None,
              log_to_driver: bool = True, logging_level: int | str = logging.WARNING,
              handle_signals: bool = False) -> Iterator[RaySession]:
    """Connect to Ray and start Serve's HTTP proxy for the ``with`` block.

    - Ray already connected in this process (a Ray task, a caller's own ``ray.init``): used
      as it is, and left connected.
    - ``RAY_ADDRESS`` set: joined; the job's runtime environment ships the project
      (:func:`code_runtime_env`) and gives the Serve instance this job starts
      :func:`serve_env` (one already running keeps its own). Left connected to nothing
      afterwards; its Serve keeps running.
    - Otherwise a local Ray (``num_cpus``, default every core) whose processes start with
      :func:`serve_env`; stopped afterwards, with its Serve.

    ``fits``: a config whose deployments must fit in that Ray, checked before a local one
    starts. ``log_to_driver=False`` leaves the replicas' logs in Ray's log files only.
    ``handle_signals``: SIGINT/SIGTERM raise :class:`ShutdownRequested` meanwhile (the
    launcher, the sweeps); tearing down ignores them, and the previous handlers come back.
    A process already connected to Ray (a Ray task) keeps Ray's handlers.

    Raises:
        ConfigError: ``fits`` needs more CPUs or GPUs than the Ray has (nothing is left running).
    """
    import ray

    handle_signals = handle_signals and not ray.is_initialized()
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS} if _in_main_thread() else {}
    if handle_signals:
        install_signal_handlers()
    connected = started = False
    model_cpus: set[int] | None = None
    try:
        if ray.is_initialized():
            pass
        elif os.environ.get("RAY_ADDRESS"):
            runtime_env = code_runtime_env(server)
            if env := serve_env(server, local=False):
                runtime_env["env_vars"] = env
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging_level,
                     log_to_driver=log_to_driver, runtime_env=runtime_env or None)
            connected = True
        else:
            if fits is not None:
                n_cpus = float(num_cpus) if num_cpus is not None else float(os.cpu_count() or 1)
                check_resources(fits, n_cpus, float(local_gpu_count()))
            env = serve_env(server, local=True)
            ray_cpus = local_ray_cpus(server, fits)
            if ray_cpus:
                model_cpus = cpus.allowed()
                env[cpus.MODEL_CPUS_ENV] = cpus.encode(model_cpus)
                logger.info("a local Ray's own processes on CPUs %s, models' on %s", cpus.encode(ray_cpus),
                            env[cpus.MODEL_CPUS_ENV])
            with environ(env), cpus.confined(ray_cpus):
                ray.init(address="local", include_dashboard=False, num_cpus=num_cpus,
                         logging_level=logging_level, log_to_driver=log_to_driver)
            connected = started = True
            logger.info("started a local Ray (http_proxy %s)", server.http_proxy)
        if handle_signals:
            install_signal_handlers()  # ray.init put its own SIGTERM handler in place
        session = RaySession(server=server, started=started, handles_signals=handle_signals,
                             model_cpus=model_cpus)
        if fits is not None and not started:
            session.check_fits(fits)
        _start_http(server)
        yield session
    finally:
        if handle_signals:
            ignore_signals()
        try:
            if started:
                from ray import serve

                serve.shutdown()
        finally:
            if connected:
                ray.shutdown()
            for sig, handler in saved.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def fetch_weights(cfg: AppConfig) -> None:
    """Each model's weights onto this machine before anything starts, with progress on the
    terminal (``Engine.fetch``: a hub model's download), where the models run here: a local
    Ray (joining a cluster, each node fetches its own). The config must fit this machine's
    CPUs and GPUs first (nothing is downloaded for a config that cannot start). Exits 1
    naming the model if a model's weights cannot be had.

    Raises:
        ConfigError: the deployments need more CPUs or GPUs than this machine has.
    """
    import sys

    from core.registry import engine_of

    if os.environ.get("RAY_ADDRESS"):
        return
    check_resources(cfg, float(os.cpu_count() or 1), float(local_gpu_count()))
    for key, model in cfg.model.items():
        try:
            engine_of(model).fetch(model)
        except RuntimeError as err:
            logger.error("model.%s.source: %s", key, err)
            sys.exit(1)


def local_ray_cpus(server: ServerConfig, app: AppConfig | None) -> set[int] | None:
    """The CPUs of a local Ray's own processes for ``server.ray_cpus`` (None: every CPU)."""
    from core.registry import engine_of

    binds = app is not None and any(engine_of(m).hosting(m).binds_cores for m in app.model.values())
    try:
        return cpus.ray_cpus(server.ray_cpus, cpus.allowed(), local_gpu_count(), binds)
    except ValueError as err:
        raise ConfigError([("server.ray_cpus", str(err))]) from None


def _start_http(server: ServerConfig) -> None:
    """Start Serve's HTTP proxy on the configured address, or join the running Serve.
    Processes that start Serve at the same moment (a Ray launcher's sweep jobs) race to create
    its controller: the one that loses joins the other's."""
    from ray import serve
    from ray.exceptions import ActorAlreadyExistsError

    options = {"http_options": {"host": server.host, "port": server.port},
               "proxy_location": server.proxy_location}
    try:
        serve.start(**options)
    except ActorAlreadyExistsError:
        serve.start(**options)


@contextlib.contextmanager
def served(cfg: AppConfig, *, session: RaySession | None = None, app_name: str | None = None,
           route_prefix: str | None = None, num_cpus: float | None = None, log_to_driver: bool = True,
           logging_level: int | str = logging.WARNING, handle_signals: bool = False,
           progress: Progress | None = None) -> Iterator[Served]:
    """Serve the validated ``cfg`` for the ``with`` block: start or join Ray and Serve (see
    :func:`ray_serve`, whose keyword arguments these are), deploy ``build_targets(cfg)``, wait until
    running, yield a :class:`Served`; tear down afterwards.

    ``session``: deploy into this open :func:`ray_serve` instead of opening one (and leave it
    open). ``app_name``/``route_prefix`` replace ``cfg.server``'s (a sweep's jobs share one
    Serve instance). ``progress``: told each model's start-up state until all are up.
    A model that fails to start stops everything or is reported in ``Served.failed``, as
    ``server.on_start_failure`` says.

    Raises:
        ConfigError: the deployments do not fit in the Ray (nothing left running).
        RuntimeError: the application failed to deploy, a model failed to start (with
            ``on_start_failure: stop``), or one was not ready within ``server.ready_timeout_s``.
        ShutdownRequested: with ``handle_signals``, a signal arrived before the block.
    """
    from apps.builder import build_targets

    name = app_name or cfg.server.app_name
    prefix = route_prefix or cfg.server.route_prefix
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(ray_serve(
                cfg.server, fits=cfg, num_cpus=num_cpus, log_to_driver=log_to_driver,
                logging_level=logging_level, handle_signals=handle_signals))
        else:
            session.check_fits(cfg)
        yield stack.enter_context(session.deployed(build_targets(cfg, name, prefix),
                                                   ready_timeout_s=cfg.server.ready_timeout_s,
                                                   on_failure=cfg.server.on_start_failure, progress=progress))
