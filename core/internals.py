"""Every use of Ray Serve's and vLLM's non-public API, in one place.

mmserve needs three things neither offers publicly (Ray 2.60, vLLM 0.25.1):

- how many replicas a handle's router can send a call to right now (Serve's request router),
  so that a call left without any fails fast with 503 instead of waiting minutes for a
  replacement (``pipelines.stages.assigned``);
- to await the moment a handle call is assigned to a replica, apart from its result;
- how many requests vLLM's output processor still holds (the engine's ``stats``, which the
  tests use to see that aborted requests leave vLLM).

Each has a check (:func:`check_ray_handle`, :func:`check_vllm_engine`) run when the feature is
first used: if the attribute is not there, a warning names the installed version and what
degrades, and the feature falls back as documented in the README ("Replica failures"). The
integration tests exercise these against real Ray and vLLM objects.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("mmserve.internals")

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _version(package: str) -> str:
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
        _warn_once("ray-router", f"Ray {_version('ray')}: a Serve handle's request router is not where "
                   "mmserve reads it (handle._router._asyncio_router._request_router.curr_replicas); "
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
        _warn_once("ray-assignment", f"Ray {_version('ray')}: a Serve call's assignment cannot be "
                   "awaited (DeploymentResponse._fetch_future_result_async is gone); calls wait "
                   "in Serve's router as Serve decides")
        return _no_assignment()
    return fetch()


async def _no_assignment() -> None:
    return None


# --- vLLM -----------------------------------------------------------------------------------

def check_vllm_engine(llm) -> bool:
    """Whether this vLLM's AsyncLLM exposes what mmserve reads; warns once if not."""
    ok = hasattr(llm, "errored") and hasattr(getattr(llm, "output_processor", None),
                                             "get_num_unfinished_requests")
    if not ok:
        _warn_once("vllm-engine", f"vLLM {_version('vllm')}: AsyncLLM.errored or "
                   "output_processor.get_num_unfinished_requests is gone; a dead engine core is "
                   "then found by Serve's health check only, and stats() reports no requests")
    return ok


def vllm_errored(llm) -> bool:
    """Whether vLLM's engine core has died (AsyncLLM marks itself errored)."""
    return bool(getattr(llm, "errored", False))


def vllm_unfinished_requests(llm) -> int:
    """Requests vLLM's output processor is still working on (aborted ones leave it)."""
    processor = getattr(llm, "output_processor", None)
    return processor.get_num_unfinished_requests() if processor is not None else 0
