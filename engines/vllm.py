"""The vLLM engine: vLLM's AsyncLLM in this process, continuously batching concurrent requests.

Tokens stream as vLLM produces them (``RequestOutputKind.DELTA``); a request whose consumer
goes away (client disconnect, deadline) is aborted in vLLM by AsyncLLM itself when its generator
is closed. ``vllm`` is imported in :meth:`VLLMEngine.start` only, so configs and the ingress
never pay for it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any, AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from core.errors import EngineError, InvalidField, NotReady
from core.protocol import EngineResult, RequestContext
from engines.base import Engine

# vLLM configures logging at import with logging.config.dictConfig, which closes every handler
# already installed, Ray Serve's buffering MemoryHandler included: closed, it keeps its place on
# the "ray.serve" logger and buffers every access-log record forever (~1.6 KB per request, found
# by the soak). Unless the user says otherwise, vLLM's loggers propagate to Ray's handlers instead.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

# On the CPU, vLLM reads gpu_memory_utilization as the share of NUMA node 0's memory to reserve
# for the KV cache; its default of 0.92 fails to start on a shared machine (STACK.md).
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

    def engine_args(self, cpu: bool) -> dict[str, Any]:
        """Keyword arguments for ``vllm.AsyncEngineArgs`` (None means vLLM's own default)."""
        args = self.model_dump(exclude_none=True, exclude={"kv_cache_space_gib"})
        if cpu:
            for k, v in CPU_DEFAULTS.items():
                args.setdefault(k, v)
        return args


class TextParams(BaseModel):
    """Per-request sampling parameters of text models."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, description="Most tokens to generate.")
    temperature: float = Field(0.7, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Sample from the k likeliest tokens; -1 is off.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = Field(None, description="Strings that end the generation.")
    seed: int | None = Field(None, description="Makes sampling repeatable.")

    def sampling_params(self):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k if self.top_k > 0 else 0,
                              frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, stop=stop, seed=self.seed,
                              output_kind=RequestOutputKind.DELTA)


def _engine_died(ctx: RequestContext) -> NotReady:
    return NotReady("the vLLM engine died; the replica is restarting", model_id=ctx.model_id,
                    headers={"Retry-After": "30"})


class VLLMEngine(Engine):
    """Generates text with vLLM's AsyncLLM from ``prompt_token_ids`` made by the preprocess node."""

    Kwargs = VLLMKwargs
    Params = TextParams

    #: seconds between checks that vLLM's engine core is alive (see :meth:`_watch_engine`)
    WATCH_PERIOD_S = 0.5

    def __init__(self, model) -> None:
        super().__init__(model)
        self.llm = None
        self.dead = False
        self._inflight: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from engines.checkpoints import resolve_source

        cpu = current_platform.is_cpu()
        if cpu and self.kwargs.kv_cache_space_gib:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kwargs.kv_cache_space_gib)
        args = AsyncEngineArgs(model=resolve_source(self.model.source), **self.kwargs.engine_args(cpu))
        self.llm = AsyncLLM.from_engine_args(args)
        self._watchdog = asyncio.create_task(self._watch_engine())

    async def _watch_engine(self) -> None:
        """When the engine core dies, vLLM marks itself errored but requests already waiting on
        it are never answered; fail them (503) instead of letting them hang."""
        while not self.llm.errored:
            await asyncio.sleep(self.WATCH_PERIOD_S)  # vLLM offers no awaitable for this
        self.dead = True
        for task in list(self._inflight):
            task.cancel()

    async def infer(self, inputs: dict, params: TextParams, ctx: RequestContext) -> AsyncIterator[EngineResult]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.dead:
            raise _engine_died(ctx)
        prompt = {"prompt_token_ids": inputs["prompt_token_ids"]}
        request_id = f"{ctx.request_id}-{uuid.uuid4().hex[:8]}"  # vLLM needs unique ids
        completion = 0
        task = asyncio.current_task()
        self._inflight.add(task)
        try:
            async for out in self.llm.generate(prompt, params.sampling_params(), request_id):
                c = out.outputs[0]
                completion += len(c.token_ids)
                yield EngineResult(output=c.text, finish_reason=c.finish_reason if out.finished else None,
                                   usage={"prompt_tokens": len(out.prompt_token_ids or ()),
                                          "completion_tokens": completion})
        except asyncio.CancelledError:
            if not self.dead:
                raise  # the client went away: AsyncLLM has aborted the request
            task.uncancel()
            raise _engine_died(ctx) from None
        except EngineDeadError:
            raise _engine_died(ctx) from None
        except ValueError as err:  # vLLM's word for a request it refuses
            raise InvalidField(str(err), model_id=ctx.model_id, field="params") from None
        except Exception as err:
            if type(err).__name__ == "EngineGenerateError":
                raise EngineError(f"generation failed: {err.__cause__ or err}", model_id=ctx.model_id) from None
            raise
        finally:
            self._inflight.discard(task)

    async def check_health(self) -> None:
        if self.llm is None:
            raise NotReady("the vLLM engine is starting")
        try:
            await self.llm.check_health()
        except Exception as err:
            raise NotReady(f"the vLLM engine is dead: {err}") from None

    def stats(self) -> dict[str, Any]:
        """``running_requests``: requests vLLM is still working on (aborted ones leave it)."""
        running = 0 if self.llm is None else self.llm.output_processor.get_num_unfinished_requests()
        return {"running_requests": running}

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
