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
import json
import logging
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import metrics
from core.errors import EngineError, InvalidField, MMServeError, NotReady
from core.protocol import EngineResult, RequestContext
from engines import vllm_internals
from engines.base import Engine, Hosting, P
from engines.vllm_core import RemoteCore, engine_args
from engines.vllm_openai import OpenAIFrontend, routes_for

logger = logging.getLogger("mmserve.vllm")

# On the CPU, vLLM reads gpu_memory_utilization as the share of NUMA node 0's memory to reserve
# for the KV cache; its default of 0.92 fails to start on a shared machine (docs/stack.md).
CPU_DEFAULTS = {"gpu_memory_utilization": 0.1}


class VLLMKwargs(BaseModel):
    """``engine_kwargs`` of a vLLM model: passed to vLLM's engine arguments when set."""

    model_config = ConfigDict(extra="forbid")

    dtype: str = Field("auto", description="auto | float16 | bfloat16 | float32.")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description=(
        "Share of GPU memory (of NUMA node 0's memory on the CPU) vLLM may use; CPU default 0.1."))
    max_model_len: int | None = Field(None, ge=16, description="Context length; default from the model.")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences batched at once.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Tokens per engine step.")
    enforce_eager: bool | None = Field(None, description="Disable CUDA graphs.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model (off unless set).")
    seed: int | None = Field(None, description="Engine-wide random seed.")
    tokenizer: str | None = Field(None, description="Tokenizer id/path if not the model's.")
    revision: str | None = Field(None, description="Hub revision of the model.")
    quantization: str | None = Field(None, description="Quantization method, e.g. awq, gptq, fp8.")
    enable_prefix_caching: bool | None = Field(None, description="Reuse KV cache of shared prefixes.")
    block_size: int | None = Field(None, ge=1, description="KV cache block size in tokens.")
    stream_interval: int | None = Field(None, ge=1, description=(
        "Tokens per streamed chunk after the first (which is sent at once); fewer, larger chunks "
        "cost less per token across the graph."))
    kv_cache_space_gib: float | None = Field(None, gt=0, description=(
        "CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); overrides gpu_memory_utilization."))
    runner: Literal["generate", "pooling"] | None = Field(None, description=(
        "generate: a text generation model (chat, completions); pooling: an embedding model "
        "(/v1/embeddings). Default: generate."))
    max_logprobs: int | None = Field(None, ge=0, description="Most logprobs a request may ask for (vLLM: 20).")
    limit_mm_per_prompt: dict[str, int] | None = Field(None, description=(
        "Multi-modal models: most items of each kind per prompt, e.g. {image: 2, video: 0}."))
    mm_processor_cache_gb: float | None = Field(None, ge=0, description=(
        "Multi-modal models: vLLM's cache of processed media (GiB); 0 turns it off, which the "
        "pinned transformers needs for Qwen2-VL (docs/models.md, \"Vision-language chat\")."))
    json_whitespace: bool | None = Field(None, description=(
        "false: structured JSON outputs (response_format, tool calls) leave out free whitespace "
        "(vLLM's structured_outputs_config.disable_any_whitespace); default: vLLM's, allowed."))
    # vLLM's OpenAI server options (``vllm serve`` flags), not engine arguments
    tool_call_parser: str | None = Field(None, description=(
        "vLLM's --tool-call-parser (hermes, llama3_json, mistral, ...): enables tool_choice auto."))
    chat_template: str | None = Field(None, description="vLLM's --chat-template: a file or a template.")
    response_role: str | None = Field(None, description="vLLM's --response-role (default assistant).")

    SERVER_OPTIONS: ClassVar[tuple[str, ...]] = ("tool_call_parser", "chat_template", "response_role")

    def engine_args(self, cpu: bool) -> dict[str, Any]:
        """Keyword arguments for ``vllm.AsyncEngineArgs`` (None means vLLM's own default)."""
        args = self.model_dump(exclude_none=True, exclude={"kv_cache_space_gib", "json_whitespace",
                                                          *self.SERVER_OPTIONS})
        if self.json_whitespace is not None:
            from vllm.config import StructuredOutputsConfig

            # vLLM's default backend ("auto") picks xgrammar or guidance per request; both honour it
            args["structured_outputs_config"] = StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=not self.json_whitespace)
        if cpu:
            for k, v in CPU_DEFAULTS.items():
                args.setdefault(k, v)
        return args

    def server_args(self) -> list[str]:
        """The ``vllm serve`` flags of the OpenAI server options that are set."""
        flags = []
        if self.tool_call_parser:
            flags += ["--tool-call-parser", self.tool_call_parser, "--enable-auto-tool-choice"]
        if self.chat_template:
            flags += ["--chat-template", self.chat_template]
        if self.response_role:
            flags += ["--response-role", self.response_role]
        return flags


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
        self._inflight: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None

    async def start(self) -> None:
        from engines.checkpoints import resolve_source

        if not self.model.source:  # refused by validation (check_config)
            raise ValueError(f"model {self.model.model_id!r}: a vLLM model needs a source")
        self.path = resolve_source(self.model.source)
        if self.model.deployment.placement == "remote_core":
            actor = self.model.deployment.engine.serve_options()["ray_actor_options"]
            self.core = RemoteCore(self.model.model_id, actor)
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

        args = engine_args(self.kwargs, self.path, self.model.model_id)
        if self.core is None:
            self.llm = AsyncLLM.from_engine_args(args)
        else:  # the frontend's config is the core's, as vllm serve makes both
            usage = vllm_internals.vllm_usage_context()
            config = args.create_engine_config(usage)
            client = await self.core.start(self.kwargs, self.path, config)
            self.llm = AsyncLLM.from_vllm_config(config, usage_context=usage, client_addresses=client)
        vllm_internals.check_vllm_engine(self.llm)
        self.client = TimedLLM(self.llm, self.model.model_id)
        self.frontend = OpenAIFrontend(self.model.model_id, self.served_routes(self.model))
        await self.frontend.start(self.client, self.path, self.kwargs.server_args())
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
        binds its threads to every core but the last (:mod:`core.cpus`)."""
        return Hosting(routes=cls.served_routes(model), core_actors=1, binds_cores=True)

    @classmethod
    def served_routes(cls, model) -> frozenset[str]:
        """The OpenAI-compatible routes vLLM's serving layer answers for ``model``."""
        return routes_for(model.options(cls.Kwargs).runner)

    @classmethod
    def check_config(cls, model) -> list[tuple[str, str]]:
        """vLLM needs the model's weights (``source``); the engine's replica must let vLLM batch
        what it can: ``max_ongoing_requests`` at least ``max_num_seqs``, or Serve caps vLLM's
        batch below it."""
        problems = []
        if not model.source:
            problems.append(("source", "a vLLM model needs its weights: a hub id or a local path"))
        seqs = model.options(cls.Kwargs).max_num_seqs
        ongoing = model.deployment.engine.max_ongoing_requests
        if seqs is not None and ongoing < seqs:
            problems.append(("deployment.engine.max_ongoing_requests",
                             f"{ongoing} is below engine_kwargs.max_num_seqs ({seqs}): Serve would never "
                             f"let vLLM batch more than {ongoing}; set it to {seqs}"))
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
        """``running_requests``: requests vLLM is still working on (aborted ones leave it)."""
        running = 0 if self.llm is None else vllm_internals.vllm_unfinished_requests(self.llm)
        return {"running_requests": running}

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
        completion = 0
        async for out in self.client.generate(prompt, params.sampling_params(), request_id):
            c = out.outputs[0]
            completion += len(c.token_ids)
            yield EngineResult(output=c.text, finish_reason=c.finish_reason if out.finished else None,
                               usage={"prompt_tokens": len(out.prompt_token_ids or ()),
                                      "completion_tokens": completion})

    async def _chat(self, messages: list, params: TextParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        """Chat ``messages`` with media parts (a vision-language model's ``/v1/infer``), rendered
        and processed by vLLM's own chat serving, streamed back as text chunks."""
        body = {**params.model_dump(exclude_none=True), "model": self.model.model_id, "messages": messages,
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


class VLLMEmbedder(VLLMBase[EmbedParams]):
    """An embedding model on vLLM's pooling runner: ``/v1/embeddings``, and ``/v1/infer`` with a
    string (one vector) or a list of strings (one vector each)."""

    Params = EmbedParams

    def __init__(self, model) -> None:
        super().__init__(model)
        self.kwargs = self.kwargs.model_copy(update={"runner": "pooling"})

    @classmethod
    def served_routes(cls, model) -> frozenset[str]:
        return routes_for("pooling")

    async def _embed(self, inputs: Any, params: EmbedParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        if not (isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                            and all(isinstance(x, str) for x in inputs))):
            raise InvalidField("input: an embedding model takes a string or a list of strings",
                               model_id=ctx.model_id, field="input")
        body = {"model": self.model.model_id, "input": inputs, **params.model_dump(exclude_none=True)}
        async for answer in self.frontend.call("embedding", body, ctx):
            vectors = [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]
            usage = answer.get("usage") or {}
            yield EngineResult(output=vectors[0] if isinstance(inputs, str) else vectors,
                               finish_reason="stop",
                               usage={"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": 0})

    def infer(self, inputs: Any, params: EmbedParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        return self._guarded(self._embed(inputs, params, ctx), ctx)
