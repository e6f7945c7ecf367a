"""The contract every engine implements.

An engine is built cheaply from its validated :class:`~core.config.ModelConfig`; heavy work
(loading weights, starting a backend) happens in :meth:`Engine.start`. Requests go through
:meth:`Engine.infer`, an async generator, so that streaming engines yield chunks as they come
and others yield once. Engines never see ``DictConfig``s or raw HTTP bodies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, AsyncIterator, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from core.config import ModelConfig
from core.errors import Unsupported
from core.protocol import Adapter, EngineResult, NoOptions, RequestContext


@dataclass(frozen=True)
class Hosting:
    """How an engine is hosted, as it declares it for one model (:meth:`Engine.hosting`): what
    the generic layers (validation, placement, the ingress, a local Ray's CPUs) ask of an engine
    instead of naming it."""

    #: the OpenAI-compatible routes the engine answers for the model (``chat``, ``completion``,
    #: ``embedding``, ``tokenize``, ``transcription``..., see ``engines.vllm_openai.ROUTES``);
    #: a route outside them is refused before the engine sees it
    routes: frozenset[str] = frozenset()
    #: Ray actors the engine starts beside the replica that hosts it, each with the model's
    #: ``deployment.engine`` resources, when its compute core runs apart from its frontend
    #: (``placement: remote_core``); 0: the engine has no core to place apart
    core_actors: int = 0
    #: CPU policy: on a host without GPUs, the engine's worker binds its threads to cores, so a
    #: local Ray's own processes keep off them (``server.ray_cpus``, ``core.cpus``)
    binds_cores: bool = False
    #: GPUs one replica of the engine (or one core actor) drives together (vLLM: tensor x
    #: pipeline parallel). Where the model reserves GPUs (``ray_actor_options.num_gpus``) and
    #: this is above 1, each replica reserves them at once as a placement group of this many
    #: one-GPU bundles (:meth:`gpu_bundles`), its own process in the first
    devices: int = 1
    #: adapters the engine serves beside the model, each under its own model id, from the
    #: model's config (vLLM: ``lora_modules``); the ingress routes their ids to this model
    adapters: tuple[Adapter, ...] = ()
    #: the engine loads adapters named at run time (vLLM: ``enable_lora``): ``POST
    #: /v1/load_lora_adapter`` may name this model as their base
    takes_adapters: bool = False
    #: adapters one replica of the engine holds at once (vLLM: ``max_cpu_loras``, else
    #: ``max_loras``); with several replicas, a request for an adapter goes first to a replica
    #: that holds it (Serve's model multiplexing, ``pipelines.deployments.EngineServer``)
    adapter_slots: int = 0
    #: starting the engine takes minutes of CPU where no GPU does the work (vLLM: three
    #: processes, each importing torch and the framework, then a compile): with
    #: ``server.slow_starts_at_once`` set, such models start after the others, that many at a
    #: time (``pipelines.router.ModelRouter.begin``)
    slow_start: bool = False

    @property
    def core(self) -> bool:
        """Whether the engine can run its core in actors of its own (``placement: remote_core``)."""
        return self.core_actors > 0

    def gpu_bundles(self, num_cpus: float, num_gpus: float,
                    resources: dict[str, float] | None = None) -> list[dict[str, float]] | None:
        """The placement group bundles of one replica that drives :attr:`devices` GPUs (its
        own process, ``num_cpus`` and its custom ``resources``, in the first, beside the first
        GPU's worker, as Serve requires), or None where the replica reserves ``num_gpus`` alone
        (one GPU or a share of one, or none)."""
        if self.devices <= 1 or num_gpus <= 0:
            return None
        first = {"GPU": 1.0, **({"CPU": num_cpus} if num_cpus > 0 else {}), **(resources or {})}
        return [first] + [{"GPU": 1.0} for _ in range(self.devices - 1)]

    def gpus_per_replica(self, num_gpus: float) -> float:
        """The GPUs one replica reserves: its ``num_gpus``, or :attr:`devices` of them in a
        placement group (:meth:`gpu_bundles`)."""
        return float(self.devices) if self.devices > 1 and num_gpus > 0 else num_gpus


#: an engine's ``Params``: what each request's params were validated as before :meth:`Engine.infer`
P = TypeVar("P", bound=BaseModel)


class Engine(ABC, Generic[P]):
    """Base of all engines.

    Subclasses set ``Kwargs`` (the schema of ``engine_kwargs``) and ``Params`` (the schema of
    per-request ``params``); both reject unknown keys, so typos fail with the field's name. An
    engine names its ``Params`` also as ``P`` (``class EchoEngine(Engine[EchoParams])``): the
    pipeline validates each request's params with ``Params`` (``pipelines.runner``), so
    :meth:`infer` receives a ``P``.
    """

    Kwargs: ClassVar[type[BaseModel]] = NoOptions
    Params: ClassVar[type[BaseModel]] = NoOptions
    #: modules the engine imports when it runs; a replica checks them on its node at start
    requires: ClassVar[tuple[str, ...]] = ()
    #: warnings of the engine's backend that ask the user to act, as (a regular expression of
    #: the log line, what to do in one line): the launcher prints the line once the models have
    #: started if the warning is in Ray's log files (``apps.log_advice``)
    log_advice: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: True while the engine starts its own backend again (its core in actors of its own,
    #: ``placement: remote_core``): its model answers 503 meanwhile, and the replica that hosts
    #: the engine need not restart
    recovering: bool = False

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.kwargs = model.options(self.Kwargs)

    async def start(self) -> None:
        """Load weights and start the backend. Called once before any request."""

    @abstractmethod
    def infer(self, inputs: Any, params: P, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        """Run one request; yield one or more results. Raises ``core.errors.MMServeError``."""

    @classmethod
    def check_config(cls, model: ModelConfig) -> list[tuple[str, str]]:
        """Rules across this engine's kwargs and the model's deployment, as ``(key under the
        model, message)`` problems for :func:`core.validate.validate_config`; none here."""
        return []

    @classmethod
    def hosting(cls, model: ModelConfig) -> Hosting:
        """How this engine is hosted for ``model``: the routes it answers, the actors it starts
        beside its replica, its CPU policy. Here: no OpenAI-compatible route, no core of its
        own, no cores bound."""
        return Hosting()

    @classmethod
    def fetch(cls, model: ModelConfig) -> None:
        """Bring ``model``'s weights onto this machine ahead of its start, showing progress on
        the terminal (the launcher calls it where a local Ray runs, so that a long download is
        seen, not silent inside a replica); raises RuntimeError if they cannot be had. Here:
        nothing (the engine loads what it needs when it starts)."""

    def openai(self, route: str, body: dict[str, Any], ctx: RequestContext) -> AsyncIterator[Any]:
        """Answer an OpenAI-compatible request in the engine's own protocol: yield one dict (the
        JSON body) or, streamed, the SSE events as strings. Raises ``core.errors.MMServeError``."""
        raise Unsupported(f"model {ctx.model_id!r} does not serve OpenAI-compatible requests",
                          model_id=ctx.model_id)

    async def load_adapter(self, adapter: Adapter) -> None:
        """Make ``adapter`` ready to serve in this replica (its weights read), ahead of its
        requests, for an engine that takes adapters (``Hosting.takes_adapters``). Raises
        ``core.errors.MMServeError`` (a path it cannot load: 400 naming ``lora_path``)."""
        raise Unsupported(f"model {adapter.base!r} takes no adapters", model_id=adapter.name)

    async def model_card(self) -> dict[str, Any]:
        """Facts for ``GET /v1/models`` that only the running engine knows (e.g. max_model_len)."""
        return {}

    async def check_health(self) -> None:
        """Raise ``core.errors.NotReady`` if the engine cannot serve requests."""

    def stats(self) -> dict[str, Any]:
        """Counters of the backend's own state (e.g. requests it is still running)."""
        return {}

    async def stop(self) -> None:
        """Release the backend's resources."""


async def collect(results: AsyncIterator[EngineResult]) -> EngineResult:
    """Fold the chunks of a streamed inference into one result (text chunks are concatenated)."""
    chunks = [r async for r in results]
    if not chunks:
        raise RuntimeError("engine produced no result")
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    output: str | list[Any]
    if all(isinstance(c.output, str) for c in chunks):
        output = "".join(c.output for c in chunks)
    else:
        output = [c.output for c in chunks]
    return EngineResult(output=output, finish_reason=last.finish_reason, usage=last.usage)
