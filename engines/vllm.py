"""The vLLM engine: vLLM's AsyncLLM in this process, continuously batching concurrent requests.

``/v1/infer`` requests arrive tokenized by the text preprocess node; the OpenAI-compatible
routes are answered by vLLM's own serving layer over the same AsyncLLM
(:mod:`engines.vllm_openai`). :class:`VLLMEmbedder` serves an embedding model on vLLM's
pooling runner. Tokens stream as vLLM produces them (``RequestOutputKind.DELTA``); a request
whose consumer goes away (client disconnect, deadline) is aborted in vLLM by AsyncLLM itself
when its generator is closed. ``vllm`` is imported only once an engine starts, so configs and
the ingress never pay for it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import metrics
from core.errors import EngineError, InvalidField, MMServeError, NotReady
from core.protocol import Adapter, EngineResult, RequestContext
from core.registry import off_loop_importing
from engines import vllm_internals
from engines.base import Engine, Hosting, P
from engines.vllm_core import RemoteCore, engine_args
from engines.vllm_openai import OpenAIFrontend, routes_for

logger = logging.getLogger("mmserve.vllm")

# On the CPU, vLLM reads gpu_memory_utilization as the share of NUMA node 0's memory to reserve
# for the KV cache; its default of 0.92 fails to start on a shared machine (docs/stack.md).
CPU_DEFAULTS = {"gpu_memory_utilization": 0.1}


class VLLMKwargs(BaseModel):
    """``engine_kwargs`` of a vLLM model: every engine argument of the installed vLLM and every
    option of its OpenAI server (``vllm serve``'s flags), under vLLM's names, with vLLM's
    meaning and types, checked against vLLM's own definitions (:mod:`engines.vllm_options`;
    ``python -m engines.vllm_options`` lists them). The fields below are the options mmserve
    reads itself (each one of vLLM's); the others are passed on as given. On the CPU,
    ``gpu_memory_utilization`` defaults to 0.1 (the user's value wins)."""

    model_config = ConfigDict(extra="allow")

    # vLLM's options that mmserve reads itself (the nodes' tokenizer and context, the engine's
    # routes, the replica's batch, the GPUs a replica reserves); their values are checked by
    # vLLM's definitions like every other
    tokenizer: str | None = Field(None, description="vLLM's tokenizer: its id or path, if not the model's.")
    revision: str | None = Field(None, description="vLLM's revision: the hub revision of the model.")
    trust_remote_code: bool = Field(False, description="vLLM's trust_remote_code (off unless set).")
    max_model_len: int | None = Field(None, description="vLLM's max_model_len; default from the model.")
    max_num_seqs: int | None = Field(None, description="vLLM's max_num_seqs: sequences batched at once.")
    runner: str | None = Field(None, description=(
        "vLLM's runner: generate (chat, completions) or pooling (embeddings, score, rerank, "
        "classify); default: from the model's architecture."))
    limit_mm_per_prompt: dict[str, Any] | None = Field(None, description=(
        "vLLM's limit_mm_per_prompt: most items of each kind per prompt, e.g. {image: 2, video: 0}."))
    tensor_parallel_size: int = Field(1, description="vLLM's tensor_parallel_size: GPUs a replica shards the model over.")
    pipeline_parallel_size: int = Field(1, description="vLLM's pipeline_parallel_size: pipeline stages, one GPU group each.")
    enable_lora: bool = Field(False, description=(
        "vLLM's enable_lora: serve LoRA adapters of the model, each under its own model id "
        "(lora_modules, and POST /v1/load_lora_adapter at run time)."))
    lora_modules: list[dict[str, Any]] | None = Field(None, description=(
        "vLLM's lora_modules: the adapters served from the start, [{name, path}]; a path is a "
        "directory, a hub id or a generated: checkpoint."))
    gpu_memory_utilization: float | None = Field(None, description=(
        "vLLM's gpu_memory_utilization: the share of a GPU's memory (on the CPU: of NUMA node 0's "
        "memory) the model may use; CPU default 0.1, since vLLM's 0.92 fails on a shared machine."))

    @model_validator(mode="wrap")
    @classmethod
    def _vllms_own(cls, data: Any, handler):
        """Every key that is not mmserve's own checked against vLLM's definitions, each problem
        under its key; then the fields above as typed."""
        if isinstance(data, dict):
            from pydantic import ValidationError
            from pydantic_core import InitErrorDetails, PydanticCustomError

            from engines import vllm_options

            found = vllm_options.problems(data, own=cls.own_options())
            if found:
                raise ValidationError.from_exception_data(cls.__name__, [
                    InitErrorDetails(type=PydanticCustomError("vllm_option", message), loc=(key,),
                                     input=data[key]) for key, message in found])
        return handler(data)

    @classmethod
    def own_options(cls) -> set[str]:
        """mmserve's own options of this engine (the fields that are not vLLM's)."""
        from engines import vllm_options

        return set(cls.model_fields) - set(vllm_options.definitions())

    def vllm_options(self, cpu: bool) -> dict[str, Any]:
        """The vLLM options that are set (defaults left to vLLM), as given."""
        values = self.model_dump(exclude_unset=True, exclude=self.own_options())
        values.update(self.model_extra or {})
        if cpu:
            for k, v in CPU_DEFAULTS.items():
                values.setdefault(k, v)
        return values

    def serve_flags(self, cpu: bool) -> list[str]:
        """These options as ``vllm serve`` flags, engine arguments and server options alike: a
        dict as JSON, a list as one value each, an adapter's ``generated:`` path resolved (how
        the benchmarks and tests start vLLM's own server with a model's config)."""
        flags = []
        for key, value in _adapter_paths_resolved(self.vllm_options(cpu)).items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                flags += [flag] if value else []
            elif isinstance(value, list):
                flags += [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
            else:
                flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
        return flags

    def engine_args(self, cpu: bool) -> dict[str, Any]:
        """Keyword arguments for ``vllm.AsyncEngineArgs``, as vLLM's types (with vLLM imported)."""
        from engines import vllm_options

        engine, _server = vllm_options.split(self.vllm_options(cpu))
        return vllm_options.typed(engine)

    def server_options(self) -> dict[str, Any]:
        """The options of vLLM's OpenAI server that are set, and the engine arguments it reads
        too, as vLLM's types (with vLLM imported); the adapters' ``generated:`` paths resolved."""
        from engines import vllm_options

        engine, server = vllm_options.split(self.vllm_options(cpu=False))
        return vllm_options.typed({**engine, **_adapter_paths_resolved(server)})


def _adapter_paths_resolved(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with each ``lora_modules`` path as vLLM reads it (a ``generated:`` adapter
    made and named by its directory)."""
    if not options.get("lora_modules"):
        return options
    from engines.checkpoints import resolve_source

    return {**options, "lora_modules": [{**m, "path": resolve_source(m["path"])} for m in options["lora_modules"]]}


class TextParams(BaseModel):
    """Per-request sampling parameters of text models on ``/v1/infer``. Each is the field of the
    same name of vLLM's OpenAI request models, with vLLM's meaning (the OpenAI routes take
    vLLM's models themselves; a unit test keeps the names in step with the pinned vLLM)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, description="Most tokens to generate.")
    temperature: float = Field(0.7, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Sample from the k likeliest tokens; -1 is off.")
    min_p: float = Field(0.0, ge=0, le=1, description="Least probability, relative to the likeliest token.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2, description="Above 1 discourages repeats.")
    stop: str | list[str] | None = Field(None, description="Strings that end the generation.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the generation.")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string in the output.")
    ignore_eos: bool = Field(False, description="Go on past the end-of-sequence token.")
    min_tokens: int = Field(0, ge=0, description="Tokens to generate before EOS or a stop may end it.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias added to its logit.")
    seed: int | None = Field(None, description="Makes sampling repeatable.")

    @model_validator(mode="after")
    def _min_within_max(self) -> "TextParams":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self

    def sampling_params(self):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k if self.top_k > 0 else 0,
                              min_p=self.min_p, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty,
                              repetition_penalty=self.repetition_penalty, stop=stop,
                              stop_token_ids=self.stop_token_ids,
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                              skip_special_tokens=self.skip_special_tokens,
                              logit_bias=self.logit_bias, seed=self.seed,
                              output_kind=RequestOutputKind.DELTA)


class TimedLLM:
    """vLLM's AsyncLLM as mmserve's engine and vLLM's serving layer call it, each generation's
    time per output token recorded (``mmserve_time_per_output_token_seconds``; outputs of the
    DELTA kind, which streams and ``/v1/infer`` ask for, carry each new token once)."""

    def __init__(self, llm, model_id: str) -> None:
        self._llm = llm
        self._model_id = model_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def generate(self, *args, **kwargs) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        timed = metrics.ENABLED and getattr(params, "output_kind", None) == RequestOutputKind.DELTA
        timer = metrics.TokenTimer()
        # closed here when our consumer goes away, so that AsyncLLM aborts the request at once
        async with aclosing(self._llm.generate(*args, **kwargs)) as outputs:
            try:
                async for out in outputs:
                    if timed:
                        timer.add(sum(len(c.token_ids) for c in out.outputs))
                    yield out
            finally:
                timer.observe(self._model_id)


class VLLMBase(Engine[P]):
    """What every engine on vLLM's AsyncLLM shares: the engine core (in this replica, or in an
    actor of its own that is started again when it dies), vLLM's serving layer over it for the
    OpenAI-compatible routes, health and stats. Subclasses answer ``/v1/infer`` for their
    ``Params``: :class:`VLLMEngine` (text), :class:`VLLMEmbedder`,
    :class:`~engines.whisper.VLLMTranscriber`."""

    requires: ClassVar[tuple[str, ...]] = ("vllm",)
    log_advice = (
        (r"libtcmalloc is not found in LD_PRELOAD",
         "vLLM on the CPU allocates memory faster with tcmalloc preloaded (its CPU install guide, "
         "'set LD_PRELOAD'): install it (apt-get install libtcmalloc-minimal4) and launch with "
         "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
    )

    Kwargs = VLLMKwargs

    #: seconds between checks that vLLM's engine core is alive (see :meth:`_watch_engine`)
    WATCH_PERIOD_S = 0.5

    #: most seconds between two tries to start a stopped engine core again
    RESTART_BACKOFF_MAX_S = 30.0

    def __init__(self, model) -> None:
        super().__init__(model)
        self.llm = None
        self.dead = False
        self.path = ""
        #: the engine core's actor (``placement: remote_core``); None: vLLM starts the core
        #: itself, as a child process of this replica
        self.core: RemoteCore | None = None
        #: the GPUs this engine drives together, reserved as one placement group per replica or
        #: core actor (``Hosting.gpu_bundles``); None: its own num_gpus, if any
        actor = model.deployment.engine.ray_actor_options
        self.gpu_bundles = self.hosting(model).gpu_bundles(actor.num_cpus, actor.num_gpus, actor.resources)
        self._inflight: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None

    async def start(self) -> None:
        from engines.checkpoints import resolve_source

        if not self.model.source:  # refused by validation (check_config)
            raise ValueError(f"model {self.model.model_id!r}: a vLLM model needs a source")
        # Off the event loop: a frontend starts inside the ingress, which answers meanwhile
        # (a generated checkpoint is written on first use, vLLM's import takes seconds).
        self.path = await off_loop_importing(resolve_source, self.model.source)
        await off_loop_importing(importlib.import_module, "vllm.v1.engine.async_llm")
        if self.model.deployment.placement == "remote_core":
            actor = self.model.deployment.engine.serve_options()["ray_actor_options"]
            self.core = RemoteCore(self.model.model_id, actor, self.gpu_bundles)
            self.core.launch()  # its import of vLLM overlaps this process's (in _open)
        try:
            await self._open()
        except BaseException:
            self._close()  # a core actor that did start must not outlive this failure
            raise
        self._watchdog = asyncio.create_task(self._watch_engine())

    async def _open(self) -> None:
        """Start AsyncLLM (with its engine core, or connected to the core's actor) and vLLM's
        serving layer over it."""
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(self.kwargs, self.path, self.model.model_id, self.gpu_bundles is not None)
        if self.core is None:
            self.llm = AsyncLLM.from_engine_args(args)
        else:  # the frontend's config is the core's, as vllm serve makes both
            usage = vllm_internals.vllm_usage_context()
            config = await off_loop_importing(args.create_engine_config, usage)
            client = await self.core.start(self.kwargs, self.path, config)
            self.llm = AsyncLLM.from_vllm_config(config, usage_context=usage, client_addresses=client)
        vllm_internals.check_vllm_engine(self.llm)
        self.client = TimedLLM(self.llm, self.model.model_id)
        self.frontend = OpenAIFrontend(self.model.model_id, self.served_routes(self.model))
        await self.frontend.start(self.client, self.path, self.kwargs.server_options())
        await self._opened()

    async def _opened(self) -> None:
        """Set-up over vLLM's serving layer, each time it is started (none here)."""

    def _close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self.core is not None:
            self.core.stop()

    @classmethod
    def hosting(cls, model) -> Hosting:
        """vLLM's serving layer answers the routes of the model's runner; its engine core can run
        in a Ray actor of its own, one per frontend (:mod:`engines.vllm_core`); its CPU worker
        binds its threads to every core but the last (:mod:`core.cpus`); with ``enable_lora``
        it serves LoRA adapters, those of ``lora_modules`` and those loaded at run time."""
        options = model.options(cls.Kwargs)
        adapters = tuple(Adapter(name=m["name"], path=m["path"], base=model.model_id)
                         for m in options.lora_modules or ())
        return Hosting(routes=cls.served_routes(model), core_actors=1, binds_cores=True,
                       devices=options.tensor_parallel_size * options.pipeline_parallel_size,
                       adapters=adapters, takes_adapters=options.enable_lora,
                       adapter_slots=cls._adapter_slots(options), slow_start=True)

    @staticmethod
    def _adapter_slots(options: VLLMKwargs) -> int:
        """The adapters vLLM keeps in a replica's memory: ``max_cpu_loras``, else ``max_loras``
        (vLLM's defaults: ``max_loras``, and 1); none without ``enable_lora``."""
        if not options.enable_lora:
            return 0
        extra = options.model_extra or {}
        return int(extra.get("max_cpu_loras") or extra.get("max_loras") or 1)

    @classmethod
    def fetch(cls, model) -> None:
        """A hub model's configs, weights and tokenizer into the hub's cache, with progress
        (vLLM then loads them from there; a directory or a generated checkpoint is left alone)."""
        from engines.checkpoints import fetch_from_hub, is_hub_id

        if model.source and is_hub_id(model.source):
            fetch_from_hub(model.source, model.options(cls.Kwargs).revision)

    @classmethod
    def served_routes(cls, model) -> frozenset[str]:
        """The OpenAI-compatible routes vLLM's serving layer answers for ``model``."""
        options = model.options(cls.Kwargs)
        return routes_for("embed" if options.runner == "pooling" else "generate", options.enable_lora)

    @classmethod
    def check_config(cls, model) -> list[tuple[str, str]]:
        """vLLM needs the model's weights (``source``); the engine's replica must let vLLM batch
        what it can: ``max_ongoing_requests`` at least ``max_num_seqs``, or Serve caps vLLM's
        batch below it."""
        problems = []
        if not model.source:
            problems.append(("source", "a vLLM model needs its weights: a hub id or a local path"))
        options = model.options(cls.Kwargs)
        seqs = options.max_num_seqs
        ongoing = model.deployment.engine.max_ongoing_requests
        if seqs is not None and ongoing < seqs:
            problems.append(("deployment.engine.max_ongoing_requests",
                             f"{ongoing} is below engine_kwargs.max_num_seqs ({seqs}): Serve would never "
                             f"let vLLM batch more than {ongoing}; set it to {seqs}"))
        if options.lora_modules and not options.enable_lora:
            problems.append(("engine_kwargs.lora_modules", "adapters need enable_lora: true (as vllm serve's "
                             "--lora-modules needs --enable-lora)"))
        placed = sorted(k for k in (options.model_extra or {}) if k.startswith("data_parallel_"))
        if model.deployment.placement == "remote_core" and placed:
            problems.append((f"engine_kwargs.{placed[0]}", "placement remote_core places the one engine "
                             "core of each frontend itself; for several engines use placement engine "
                             "with deployment.engine.num_replicas"))
        share = model.deployment.engine.ray_actor_options.num_gpus
        used = options.gpu_memory_utilization if options.gpu_memory_utilization is not None else 0.92
        if 0 < share < 1 and used > share + 1e-9:
            problems.append(("engine_kwargs.gpu_memory_utilization",
                             f"{used:g} of the GPU's memory, but the model reserves {share:g} of a GPU "
                             f"(deployment.engine.ray_actor_options.num_gpus): the models Ray places on one "
                             f"card could ask for more than it has; set it to {share:g} or less"
                             + ("" if options.gpu_memory_utilization is not None else " (vLLM's default is 0.92)")))
        return problems

    async def _watch_engine(self) -> None:
        """When the engine core dies, vLLM marks itself errored (a core of its own) or the
        core's actor call ends (``remote_core``), but requests already waiting on it are never
        answered: fail them (503) instead of letting them hang. A core of vLLM's own is then
        restarted with this replica by Serve's health check; a core in its own actor is
        started again here, this replica and its other models serving on meanwhile."""
        while True:
            while not (vllm_internals.vllm_errored(self.llm) or (self.core is not None and self.core.gone)):
                await asyncio.sleep(self.WATCH_PERIOD_S)  # vLLM offers no awaitable for this
            self.dead = True
            for task in list(self._inflight):
                task.cancel()
            if self.core is None:
                return
            await self._restart(self.core.why)

    async def _restart(self, why: str) -> None:
        """Start the engine core's actor again (it stopped: ``why``) until it serves."""
        self.recovering = True
        logger.warning("model %s: its vLLM engine core stopped (%s); starting another",
                       self.model.model_id, why)
        delay = 1.0
        while True:
            self._close()
            try:
                await self._open()
                break
            except Exception:
                logger.exception("model %s: the vLLM engine core failed to start again; next try "
                                 "in %.0f s", self.model.model_id, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.RESTART_BACKOFF_MAX_S)
        logger.info("model %s: its vLLM engine core is serving again", self.model.model_id)
        self.dead = self.recovering = False

    def _died(self, ctx: RequestContext) -> NotReady:
        restarts = "the replica is restarting" if self.core is None else "its engine core is starting again"
        return NotReady(f"the vLLM engine died; {restarts}", model_id=ctx.model_id, retry="engine_dead")

    async def _guarded(self, chunks: AsyncIterator, ctx: RequestContext) -> AsyncIterator:
        """``chunks`` (vLLM work for one request), failed with 503 if the engine core dies
        meanwhile, and with the error vocabulary for what vLLM refuses or fails at."""
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if self.dead:
            raise self._died(ctx)
        task = asyncio.current_task()
        assert task is not None  # a request's generator is iterated by its request's task
        self._inflight.add(task)
        try:
            async for chunk in chunks:
                yield chunk
        except asyncio.CancelledError:
            if not self.dead:
                raise  # the client went away: AsyncLLM has aborted the request
            task.uncancel()
            raise self._died(ctx) from None
        except EngineDeadError:
            raise self._died(ctx) from None
        except MMServeError:
            if not self.dead:
                raise
            # vLLM's serving layer answers the cancellation itself ("Client disconnected")
            if task.cancelling():
                task.uncancel()
            raise self._died(ctx) from None
        except EngineGenerateError as err:
            raise EngineError(f"generation failed: {err.__cause__ or err}", model_id=ctx.model_id) from None
        except ValueError as err:  # vLLM's word for a request it refuses
            raise InvalidField(str(err), model_id=ctx.model_id, field="params") from None
        finally:
            self._inflight.discard(task)

    def openai(self, route: str, body: dict, ctx: RequestContext) -> AsyncIterator[Any]:
        return self._guarded(self.frontend.call(route, body, ctx), ctx)

    async def load_adapter(self, adapter: Adapter) -> None:
        await self.frontend.adapter(adapter)

    async def model_card(self) -> dict[str, Any]:
        return await self.frontend.model_card()

    async def check_health(self) -> None:
        if self.core is not None:
            return  # the core restarts by itself (_watch_engine): no reason to restart this replica
        if self.llm is None:
            raise NotReady("the vLLM engine is starting")
        try:
            await self.llm.check_health()
        except Exception as err:
            raise NotReady(f"the vLLM engine is dead: {err}") from None

    def stats(self) -> dict[str, Any]:
        """``running_requests``: requests vLLM is still working on (aborted ones leave it);
        ``adapters``: the LoRA adapters this replica's serving layer has loaded."""
        running = 0 if self.llm is None else vllm_internals.vllm_unfinished_requests(self.llm)
        frontend = getattr(self, "frontend", None)
        adapters = sorted(vllm_internals.vllm_loras(frontend.state)) if frontend and frontend.state else []
        return {"running_requests": running, "adapters": adapters}

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._close()


class VLLMEngine(VLLMBase[TextParams]):
    """Generates text with vLLM's AsyncLLM from ``prompt_token_ids`` made by the preprocess node."""

    Params = TextParams

    async def _generate(self, inputs: dict, params: TextParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        prompt = {"prompt_token_ids": inputs["prompt_token_ids"]}
        request_id = f"{ctx.request_id}-{uuid.uuid4().hex[:8]}"  # vLLM needs unique ids
        lora = None if ctx.adapter is None else await self.frontend.adapter(ctx.adapter)
        completion = 0
        traced = {} if ctx.trace is None else {"trace_headers": ctx.trace}  # vLLM's span under the engine's
        async for out in self.client.generate(prompt, params.sampling_params(), request_id, lora_request=lora,
                                              **traced):
            c = out.outputs[0]
            completion += len(c.token_ids)
            yield EngineResult(output=c.text, finish_reason=c.finish_reason if out.finished else None,
                               usage={"prompt_tokens": len(out.prompt_token_ids or ()),
                                      "completion_tokens": completion})

    async def _chat(self, messages: list, params: TextParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        """Chat ``messages`` with media parts (a vision-language model's ``/v1/infer``), rendered
        and processed by vLLM's own chat serving, streamed back as text chunks."""
        body = {**params.model_dump(exclude_none=True), "model": ctx.model_id, "messages": messages,
                "stream": True, "stream_options": {"include_usage": True}}
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        finish = None
        async for event in self.frontend.call("chat", body, ctx):
            data = event.removeprefix("data: ").strip()
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            for choice in chunk.get("choices") or ():
                finish = choice.get("finish_reason") or finish
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    yield EngineResult(output=text)
            if chunk.get("usage"):
                u = chunk["usage"]
                yield EngineResult(output="", finish_reason=finish,
                                   usage={"prompt_tokens": u["prompt_tokens"],
                                          "completion_tokens": u["completion_tokens"]})

    def infer(self, inputs: dict[str, Any], params: TextParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        if "messages" in inputs:  # from the chat_media node: vLLM renders the chat and its media
            return self._guarded(self._chat(inputs["messages"], params, ctx), ctx)
        return self._guarded(self._generate(inputs, params, ctx), ctx)


class EmbedParams(BaseModel):
    """Per-request parameters of embedding models on ``/v1/infer`` (vLLM's names and meaning)."""

    model_config = ConfigDict(extra="forbid")

    dimensions: int | None = Field(None, ge=1, description="Truncate vectors (Matryoshka models only).")
    use_activation: bool | None = Field(None, description=(
        "The pooler's activation (for embeddings: L2 normalization); default: the model's."))


#: architectures vLLM's pooling runner serves as classifiers (``convert`` auto: its table of
#: suffixes, ``vllm.config.model.iter_architecture_defaults``; tests/unit check they agree)
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForAudioClassification",
                       "ForImageClassification", "ForVideoClassification", "ClassificationModel")


class VLLMEmbedder(VLLMBase[EmbedParams]):
    """A pooling model on vLLM's pooling runner. An embedding model: ``/v1/embeddings``, and
    ``/v1/infer`` with a string (one vector) or a list of strings (one vector each). A classifier
    (a cross-encoder or reranker too): ``/classify``, and ``/v1/infer`` the same way with
    ``{"label", "probs"}`` for a vector. Both: score, rerank and pooling."""

    Params = EmbedParams

    def __init__(self, model) -> None:
        super().__init__(model)
        self.kwargs = self.kwargs.model_copy(update={"runner": "pooling"})

    @classmethod
    def served_routes(cls, model) -> frozenset[str]:
        """An embedding model's pooling routes, or a classifier's (a cross-encoder or reranker
        included): ``classify`` where vLLM serves it as one, see :meth:`task`."""
        return routes_for(cls.task(model))

    @classmethod
    def task(cls, model) -> str:
        """``classify`` or ``embed``, as vLLM's pooling runner decides: ``convert`` where set,
        else by the checkpoint's architecture (vLLM's ``ForSequenceClassification`` and the other
        classifier suffixes, :data:`CLASSIFIER_SUFFIXES`), read where the checkpoint is on this
        machine (the launcher fetches a hub model before anything starts); ``embed`` otherwise."""
        from engines.checkpoints import architectures

        convert = (model.options(cls.Kwargs).model_extra or {}).get("convert")
        if convert not in (None, "auto"):
            return "classify" if convert == "classify" else "embed"
        archs = architectures(model.source) if model.source else []
        return "classify" if any(a.endswith(CLASSIFIER_SUFFIXES) for a in archs) else "embed"

    async def _embed(self, inputs: Any, params: EmbedParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        if not (isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                            and all(isinstance(x, str) for x in inputs))):
            raise InvalidField("input: an embedding model takes a string or a list of strings",
                               model_id=ctx.model_id, field="input")
        body = {"model": ctx.model_id, "input": inputs, **params.model_dump(exclude_none=True)}
        classify = "classify" in self.frontend.routes
        async for answer in self.frontend.call("classify" if classify else "embedding", body, ctx):
            data = sorted(answer["data"], key=lambda d: d["index"])
            outputs = ([{"label": d["label"], "probs": d["probs"]} for d in data] if classify
                       else [d["embedding"] for d in data])
            usage = answer.get("usage") or {}
            yield EngineResult(output=outputs[0] if isinstance(inputs, str) else outputs,
                               finish_reason="stop",
                               usage={"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": 0})

    def infer(self, inputs: Any, params: EmbedParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        return self._guarded(self._embed(inputs, params, ctx), ctx)
