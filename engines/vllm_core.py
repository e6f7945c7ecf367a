"""vLLM's engine core in a Ray actor of its own, its frontend in this process
(``placement: remote_core``).

vLLM's own server is two processes: the API server, where the HTTP request is, runs AsyncLLM
(tokenizing, detokenizing, vLLM's OpenAI serving layer) and talks over ZMQ to the engine core
process, which schedules and runs the model. With this placement mmserve splits a model the
same way: AsyncLLM in the ingress replica, as ``inline`` would have it, and the engine core in
a :class:`CoreHost` actor that Ray places with the engine's ``ray_actor_options`` (its CPUs,
GPUs, custom resources: on any node of a cluster). They meet through vLLM's own handshake, as a
``vllm serve --headless`` engine meets its frontend, and stream tokens over vLLM's own sockets:
no Ray call per request or per chunk.

When the core dies (its process killed, the actor gone, the model failing), :class:`RemoteCore`
sees the actor's ``run`` call end; the engine then fails its requests with 503 and starts a new
core and frontend, while the ingress and every other model keep serving.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from core import cpus, tracing
from engines import vllm_internals

#: the environment variable that names the model of an engine core's process
CORE_OF = "MMSERVE_ENGINE_CORE_OF"

# vLLM configures logging at import with logging.config.dictConfig, which closes every handler
# already installed, Ray Serve's buffering MemoryHandler included: closed, it keeps its place on
# the "ray.serve" logger and buffers every access-log record forever (~1.6 KB per request, found
# by the soak). Unless the user says otherwise, vLLM's loggers propagate to Ray's handlers
# instead. Set here, where both the engine (engines.vllm imports this module) and a core's
# actor import from, before either imports vLLM.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
# vLLM's CPU LoRA kernels give base-model tokens the last adapter's weights in a mixed batch:
# fixed by mmserve's vLLM plugin in the processes of its engines, vLLM's workers included
# (engines.vllm_internals.register_cpu_lora_fix)
os.environ.setdefault("MMSERVE_VLLM_CPU_LORA_FIX", "1")


def engine_args(kwargs, path: str, model_id: str, gpu_group: bool = False):
    """vLLM's ``AsyncEngineArgs`` of a model (``kwargs``: its ``VLLMKwargs``), the same for its
    frontend and its core. ``gpu_group``: the replica (or core actor) reserved its GPUs as one
    placement group (``engines.base.Hosting.gpu_bundles``): vLLM's workers then go in it as Ray
    actors, as Ray Serve LLM has them (unless the config sets ``distributed_executor_backend``)."""
    from vllm import AsyncEngineArgs
    from vllm.platforms import current_platform

    args = kwargs.engine_args(current_platform.is_cpu())
    if gpu_group:
        args.setdefault("distributed_executor_backend", "ray")
    if (traces := tracing.endpoint()) is not None:  # vLLM's own spans of each request, under the engine's
        args.setdefault("otlp_traces_endpoint", traces)
    return AsyncEngineArgs(model=path, served_model_name=[model_id], **args)


class CoreHost:
    """A Ray actor that is one vLLM engine core: :meth:`run` serves until the core stops.

    It imports vLLM's engine core as it is created (tens of seconds of CPU on a small machine),
    while its frontend imports vLLM's AsyncLLM: the two imports overlap instead of following
    each other. ``run`` waits in the actor's queue meanwhile."""

    def __init__(self) -> None:
        cpus.for_models()  # before vLLM binds its worker to the cores it sees
        vllm_internals.vllm_import_core()

    def run(self, kwargs, path: str, model_id: str, handshake: str, gpu_group: bool) -> None:
        config = engine_args(kwargs, path, model_id, gpu_group).create_engine_config(
            vllm_internals.vllm_usage_context(), headless=True)
        vllm_internals.vllm_run_core(config, handshake)


class RemoteCore:
    """The frontend's side of one :class:`CoreHost`: starts it, hands vLLM's handshake its
    addresses and tells when it is gone."""

    def __init__(self, model_id: str, actor_options: dict[str, Any],
                 gpu_bundles: list[dict[str, float]] | None = None) -> None:
        self.model_id = model_id
        self.actor_options = actor_options
        #: the GPUs the core drives together, reserved as one placement group per actor
        #: (``engines.base.Hosting.gpu_bundles``); None: the actor's own num_gpus
        self.gpu_bundles = gpu_bundles
        self.group: Any = None  # that placement group, once launched
        self.actor: Any = None  # the CoreHost actor's handle, once launched
        self.ended: asyncio.Future | None = None  # done once the core has stopped, for any reason
        self.why = ""

    @property
    def gone(self) -> bool:
        return self.ended is not None and self.ended.done()

    def launch(self) -> None:
        """Create the core's actor, which starts importing vLLM at once (see :class:`CoreHost`);
        the frontend calls this before it imports vLLM itself, and :meth:`stop` undoes it."""
        import ray

        name = f"mmserve.core.{self.model_id}.{uuid.uuid4().hex[:8]}"
        runtime_env = dict(self.actor_options.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), CORE_OF: self.model_id}
        options = {**self.actor_options, "runtime_env": runtime_env}
        if self.gpu_bundles:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # the actor in the first bundle, vLLM's GPU workers (its children) in all of them
            self.group = ray.util.placement_group(self.gpu_bundles, strategy="PACK", name=name)
            options["num_gpus"] = 0
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        self.actor = ray.remote(CoreHost).options(name=name, max_restarts=0, **options).remote()

    async def start(self, kwargs, path: str, vllm_config) -> dict[str, str]:
        """Start the core (in the actor :meth:`launch` created, or a new one) and wait until
        vLLM's handshake with it is done; returns the ``client_addresses`` for AsyncLLM. Raises
        RuntimeError if the core stops first."""
        import ray

        vllm_internals.check_vllm_remote_core()
        handshake, addresses, client = vllm_internals.vllm_core_addresses(ray.util.get_node_ip_address())
        if self.actor is None:
            self.launch()
        run = self.actor.run.remote(kwargs, path, self.model_id, handshake, bool(self.gpu_bundles))
        gone_r, gone_w = os.pipe()
        self.ended = asyncio.ensure_future(self._watch(run, gone_w))
        try:
            await asyncio.to_thread(vllm_internals.vllm_await_core, handshake, addresses, vllm_config, gone_r)
        except RuntimeError:
            await asyncio.wait({self.ended}, timeout=5)
            raise RuntimeError(f"the vLLM engine core of {self.model_id!r} stopped while starting: "
                               f"{self.why or 'see its log'}") from None
        finally:
            os.close(gone_r)
        return client

    async def _watch(self, run, gone_w: int) -> None:
        try:
            await run
            self.why = "it exited"
        except Exception as err:  # the actor died, or the core raised
            self.why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        finally:
            try:
                os.write(gone_w, b"x")  # wakes the handshake if it still waits
            except OSError:  # it is over: nobody reads any more
                pass
            os.close(gone_w)

    def stop(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)
            self.actor = None
        if self.group is not None:
            ray.util.remove_placement_group(self.group)
            self.group = None
