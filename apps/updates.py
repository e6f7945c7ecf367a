"""Updates of a running launcher: ``python -m apps.launch --update [overrides]``.

The launcher opens a channel (a small named Ray actor, ``mmserve-updates:<app_name>`` in the
``mmserve`` namespace, no CPU) and applies, one at a time, each config sent over it with
``apps.serving.RaySession.update``: in place, in the launcher's own Ray job, so that what it
deploys runs with the code and environment the launcher shipped. ``--update`` composes and
validates the new config where it runs (exit 2, nothing sent, if invalid), sends it, and prints
what changed (exit 1 if the launcher could not apply it; it keeps serving the old config then).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

logger = logging.getLogger("mmserve.launch")

NAMESPACE = "mmserve"


def channel_name(app_name: str) -> str:
    return f"mmserve-updates:{app_name}"


def _channel_class():
    import asyncio

    import ray

    @ray.remote(num_cpus=0, max_concurrency=64)
    class UpdateChannel:
        """Holds sent configs until the launcher takes them, and hands back its answers."""

        def __init__(self) -> None:
            self.pending: asyncio.Queue = asyncio.Queue()
            self.current: asyncio.Future | None = None

        async def submit(self, raw: dict) -> dict:
            answer = asyncio.get_running_loop().create_future()
            await self.pending.put((raw, answer))
            return await answer

        async def take(self) -> dict:
            raw, self.current = await self.pending.get()
            return raw

        async def answer(self, result: dict) -> None:
            if self.current is not None and not self.current.done():
                self.current.set_result(result)
            self.current = None

    return UpdateChannel


def open_channel(app_name: str, apply: Callable[[dict], dict]) -> Callable[[], None]:
    """Create the channel of ``app_name`` and apply what arrives on it, in a thread, with
    ``apply(raw config) -> answer``; returns a function that closes it."""
    import ray

    actor = _channel_class().options(name=channel_name(app_name), namespace=NAMESPACE,
                                     get_if_exists=False).remote()
    stop = threading.Event()

    def serve_updates() -> None:
        while not stop.is_set():
            try:
                raw = ray.get(actor.take.remote())
            except Exception:  # the channel or Ray went away: the launcher is stopping
                return
            try:
                result = apply(raw)
            except Exception as err:
                logger.exception("update failed; still serving the previous config")
                result = {"ok": False, "error": str(err)}
            try:
                ray.get(actor.answer.remote(result))
            except Exception:
                return

    threading.Thread(target=serve_updates, name="mmserve updates", daemon=True).start()

    def close() -> None:
        stop.set()
        try:
            ray.kill(actor)
        except Exception:
            pass

    return close


def send(app_name: str, raw: dict, timeout_s: float) -> dict[str, Any]:
    """Send ``raw`` (a composed config) to the launcher serving ``app_name`` and wait for its
    answer. Joins the Ray in ``RAY_ADDRESS``, or the one running on this machine.

    Raises:
        RuntimeError: no launcher serves ``app_name`` there, or it did not answer in time.
    """
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", logging_level=logging.ERROR,
             log_to_driver=False)
    try:
        try:
            actor = ray.get_actor(channel_name(app_name), namespace=NAMESPACE)
        except ValueError:
            raise RuntimeError(f"no launcher serving application {app_name!r} runs on this Ray "
                               f"(no actor {channel_name(app_name)!r} in namespace {NAMESPACE!r})") from None
        try:
            return ray.get(actor.submit.remote(raw), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the launcher did not answer within {timeout_s:g}s") from None
    finally:
        ray.shutdown()
