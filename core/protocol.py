"""What travels through a pipeline: the HTTP request body, the per-request context, engine output."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class NoOptions(BaseModel):
    """The schema of an engine's or node's options when it takes none."""

    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] = Field(..., description=(
        "A string, or OpenAI's content parts ([{\"type\": \"text\", \"text\": ...}, ...])."))
    name: str | None = None


class InferRequest(BaseModel):
    """Body of ``POST /v1/infer``."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(..., min_length=1, description="A model_id listed by GET /v1/models.")
    input: Any = Field(None, description="The model's input; its shape depends on the modality.")
    prompt: str | None = Field(None, description="Alias of input for text models.")
    messages: list[ChatMessage] | None = Field(None, min_length=1,
                                               description="Chat turns, for text models with a chat template.")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="Per-request parameters, checked by the model's engine.")
    stream: bool = Field(False, description="Answer with Server-Sent Events, one per chunk.")

    def model_input(self) -> Any:
        """The input from ``input``, ``prompt`` or ``messages``; raises InvalidField unless exactly one."""
        from core.errors import InvalidField

        given = [k for k in ("input", "prompt", "messages") if getattr(self, k) is not None]
        if not given:
            raise InvalidField("input (or prompt, or messages) is required", model_id=self.model_id,
                               field="input")
        if len(given) > 1:
            raise InvalidField(f"give one of input, prompt or messages, not {' and '.join(given)}",
                               model_id=self.model_id, field=given[1])
        if self.messages is not None:
            return {"messages": [m.model_dump(exclude_none=True) for m in self.messages]}
        return self.input if self.prompt is None else self.prompt


class InferResponse(BaseModel):
    """Body of a successful ``POST /v1/infer``."""

    model_id: str
    output: Any
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass(frozen=True)
class Adapter:
    """An adapter of a base model (e.g. a LoRA adapter of an LLM), served under its own model
    id: ``name`` (that id), ``path`` (a directory, a hub id or a ``generated:`` checkpoint, as
    the config or the load request gave it) and ``base`` (the base model's id)."""

    name: str
    path: str
    base: str


@dataclass
class RequestContext:
    """Travels with a request through every node.

    ``deadline`` is wall-clock (``time.time()``), so that replicas in other processes and on
    other machines of the cluster work to the same one. ``stage`` names the step running now.
    """

    request_id: str
    model_id: str
    deadline: float | None = None
    timeout_s: float | None = None
    stage: str = "ingress"
    params: Any = None  # the request's validated params, the engine's Params (set by the pipeline)
    adapter: Adapter | None = None  # the adapter ``model_id`` names, if it names one of a base model
    trace: dict[str, str] | None = None  # W3C headers of the span that runs now (core.tracing); None: untraced

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.time()


@dataclass
class EngineResult:
    """What an engine produced for one request (one chunk when streaming, or the whole)."""

    output: Any
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    info: dict[str, Any] | None = None  # facts about the input for the response (e.g. duration_s)


@dataclass
class MediaPayload:
    """Decoded media on its way from a preprocess node to an engine.

    ``data`` is a tensor (a mono waveform, an image ``[3, H, W]``, frames ``[N, 3, H, W]``);
    ``info`` holds what the response reports about the input (``duration_s``, frame
    ``timestamps_s``, the original ``width``/``height``, the ``sample_rate``). Images travel
    as uint8 (a quarter of float32's bytes through Ray's object store); ``finish`` (e.g. scale
    and normalize) turns them into the model's input where the model runs.
    """

    data: Any
    info: dict[str, Any]
    finish: Any = None  # a transform the engine applies on arrival, so a compact dtype crosses hops

    def __reduce__(self):
        """Across a handle hop a tensor travels as a numpy array of its own elements: Ray's
        serializer ships that as an out-of-band buffer, where torch pickles a tensor through its
        own storage format, and a cropped view with the whole storage it views (BENCHMARKS.md,
        "Media throughput with batching": 0.19 against 1.2 ms of CPU per image, with
        ``nodes.vision.ScaleNormalize`` as ``finish``)."""
        data = self.data
        if type(data).__module__ == "torch" and hasattr(data, "numpy"):
            import numpy as np

            # numpy's copy of a cropped view, not torch's (which wakes its thread pool)
            return _media_payload, (np.ascontiguousarray(data.numpy()), True, self.info, self.finish)
        return _media_payload, (data, False, self.info, self.finish)


def _media_payload(data: Any, tensor: bool, info: dict[str, Any], finish: Any) -> MediaPayload:
    if tensor:
        import numpy as np
        import torch

        data = torch.from_numpy(np.array(data))  # a copy: what Ray hands over is read-only
    return MediaPayload(data=data, info=info, finish=finish)


@dataclass
class Refusal:
    """An error of the vocabulary (``core.errors``) sent back across a handle hop as a value
    instead of raised: Ray Serve logs every exception a replica raises as a failed request,
    traceback and all, and a client's bad input is not one. The calling side raises it."""

    error: Any


@dataclass
class OpenAIBody:
    """An OpenAI-compatible request on its way to a preprocess node that checks such bodies
    (``route``: ``chat``, ``completion``...; ``body``: the JSON object, changed in place)."""

    route: str
    body: dict[str, Any]


@runtime_checkable
class TokenizerOptions(Protocol):
    """The engine options (an engine's ``Kwargs``, typed) that a node tokenizing for the engine
    reads: where the model's tokenizer is, and the context the engine allows (None: the
    model's own)."""

    tokenizer: str | None
    revision: str | None
    trust_remote_code: bool
    max_model_len: int | None


@runtime_checkable
class MediaChatOptions(Protocol):
    """The engine options that a node checking a chat's media reads: how many items of each
    kind (``image``, ``video``) one prompt may hold (None: the engine's defaults)."""

    limit_mm_per_prompt: dict[str, int] | None
