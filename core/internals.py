"""Every use of Ray Serve's non-public API, in one place.

mmserve needs six things Ray Serve does not offer publicly (Ray 2.60):

- how many replicas a handle's router can send a call to right now (Serve's request router),
  so that a call left without any fails fast with 503 instead of waiting minutes for a
  replacement (``pipelines.stages.assigned``);
- to await the moment a handle call is assigned to a replica, apart from its result;
- a deployment version of its own choosing on ``serve.run`` (Serve gives every ``serve.run`` a
  random one, which restarts every replica): with it, deploying a model again with what Serve
  applies in place (replicas, autoscaling, queue limits, health checks, the ingress's model set
  as ``user_config``) restarts nothing (:func:`pinned_version`);
- a handle to a deployment that may not exist yet (``serve deploy`` starts a new model's
  application while the ingress already learns of it): ``get_deployment_handle`` otherwise
  asks the controller, blocking, and fails (:func:`deployment_handle`);
- where a local Ray writes its logs, for the launcher to print (:func:`ray_logs_dir`);
- Serve's application statuses without ``serve.status()``'s cost in a process that has
  imported much (:func:`serve_applications`).

Each has a check (:func:`check_ray_handle`) or a fallback run when the feature is first used:
if the attribute is not there, a warning names the installed version and what degrades, and the
feature falls back as documented in docs/http-api.md ("When something fails"). An engine's
backend fences its own non-public API in a module of its own in ``engines/`` (its
``*_internals.py``), with :func:`warn_once` and :func:`installed_version` from here. The
integration tests exercise these against real Ray objects; ``tests/unit/test_private_api.py``
keeps every other module of the layers to Ray's public API.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("mmserve.internals")

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def installed_version(package: str) -> str:
    """The installed version of ``package`` (or of its ``-cpu`` build), or ``unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


# --- Ray Serve ----------------------------------------------------------------------------

def _request_router(handle) -> Any:
    router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    return getattr(router, "_request_router", None)


def check_ray_handle(handle) -> bool:
    """Whether this Ray's handles expose the router state mmserve reads; warns once if not."""
    request_router = _request_router(handle)
    ok = request_router is not None and hasattr(request_router, "curr_replicas")
    if not ok and getattr(handle, "_router", None) is not None:  # a router exists, built otherwise
        warn_once("ray-router", f"Ray {installed_version('ray')}: a Serve handle's request router is "
                  "not where mmserve reads it "
                  "(handle._router._asyncio_router._request_router.curr_replicas); "
                  "calls that meet a dead replica in Serve's router wait for its replacement "
                  "instead of failing fast with 503")
    return ok


def routable_replicas(handle) -> int | None:
    """How many replicas the handle's Serve router can send a call to right now, or None while
    it does not know yet (or where Ray's router is built otherwise)."""
    request_router = _request_router(handle)
    if request_router is None or not check_ray_handle(handle) or not handle.running_replicas_populated():
        return None
    return len(request_router.curr_replicas)


def assignment(response):
    """An awaitable that completes when Serve's router has given ``response`` (a handle call)
    to a replica; the call's result is awaited separately."""
    fetch = getattr(response, "_fetch_future_result_async", None)
    if fetch is None:
        warn_once("ray-assignment", f"Ray {installed_version('ray')}: a Serve call's assignment cannot be "
                  "awaited (DeploymentResponse._fetch_future_result_async is gone); calls wait "
                  "in Serve's router as Serve decides")
        return _no_assignment()
    return fetch()


async def _no_assignment() -> None:
    return None


def pinned_version(deployment, version: str):
    """``deployment`` with ``version`` as its Serve code version: ``serve.run`` again with the
    same version updates its replicas in place where Serve can (``Deployment.options(version=)``
    is reserved to Serve's own callers, ``_internal=True``). Where this Ray refuses it, a warning
    says so and the deployment keeps Serve's random version: updates then restart it."""
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError) as err:
        warn_once("ray-version", f"Ray {installed_version('ray')}: a deployment's version cannot be set "
                  f"({err}); every update of a running application restarts its replicas")
        return deployment


def ray_logs_dir() -> str | None:
    """The log directory of the Ray this process is connected to, where it is on this machine
    (Ray's ``_global_node``; None where it is not known)."""
    try:
        import ray

        node = ray._private.worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # moved or renamed in this Ray
        return None


def deployment_handle(deployment: str, app_name: str):
    """A handle to ``deployment`` of ``app_name``, made without asking the controller whether
    it exists yet (calls wait for its replicas, as for any deployment starting)."""
    import inspect

    from ray import serve

    if "_check_exists" in inspect.signature(serve.get_deployment_handle).parameters:
        return serve.get_deployment_handle(deployment, app_name=app_name, _check_exists=False)
    warn_once("ray-handle", f"Ray {installed_version('ray')}: get_deployment_handle has no "
              "_check_exists; a model must be running before the ingress learns of it (serve "
              "deploy may fail to add one)")
    return serve.get_deployment_handle(deployment, app_name=app_name)


@dataclass(frozen=True)
class DeploymentState:
    """What Serve says of one deployment of an application."""

    status: str                     # HEALTHY, UPDATING, UNHEALTHY, DEPLOY_FAILED... (Serve's)
    message: str
    replica_states: dict[str, int]  # STARTING, RUNNING, PENDING_ALLOCATION... -> how many


@dataclass(frozen=True)
class ApplicationState:
    """What Serve says of one application (``serve.status().applications[name]``'s fields)."""

    status: str                     # RUNNING, DEPLOYING, DEPLOY_FAILED... (Serve's)
    message: str
    deployments: dict[str, DeploymentState]

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"

    @property
    def failed(self) -> bool:
        return self.status == "DEPLOY_FAILED"


def _word(value: Any) -> str:
    """A Serve status as its word: ``ApplicationStatus.RUNNING`` and ``"RUNNING"`` alike."""
    return str(getattr(value, "value", value)).rsplit(".", 1)[-1]


def serve_applications() -> dict[str, ApplicationState]:
    """Every Serve application's status, by name, read from the controller's own details.

    ``serve.status()`` builds pydantic models of those details, and each deployment's model
    pickles its request router's class by value (Ray 2.60), which scans ``sys.modules``: in a
    process that has imported torch and an LLM framework (the ingress), its two calls a second
    while models start took 40% of a core from the models starting beside it. Falls back to
    ``serve.status()`` where the controller's client is not where this Ray keeps it."""
    from ray import serve

    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        details = client.get_serve_details() if client is not None else {"applications": {}}
        return {name: ApplicationState(
            status=_word(app.get("status", "")), message=app.get("message") or "",
            deployments={d: DeploymentState(status=_word(dep.get("status", "")), message=dep.get("message") or "",
                                            replica_states=dict(Counter(_word(r.get("state", ""))
                                                                        for r in dep.get("replicas") or ())))
                         for d, dep in (app.get("deployments") or {}).items()})
            for name, app in (details.get("applications") or {}).items()}
    except (ImportError, AttributeError) as err:
        warn_once("serve-details", f"Ray {installed_version('ray')}: the controller's details are not "
                  f"where they were ({err}); Serve's status is read through serve.status(), which "
                  "costs the ingress CPU while models start")
    return {name: ApplicationState(
        status=_word(app.status), message=app.message or "",
        deployments={d: DeploymentState(status=_word(dep.status), message=dep.message or "",
                                        replica_states={_word(s): n for s, n in (dep.replica_states or {}).items()})
                     for d, dep in app.deployments.items()})
        for name, app in serve.status().applications.items()}
