"""What travels through a pipeline: the HTTP request body, the per-request context, engine output."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class InferRequest(BaseModel):
    """Body of ``POST /v1/infer``."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(..., min_length=1, description="A model_id listed by GET /v1/models.")
    input: Any = Field(None, description="The model's input; its shape depends on the modality.")
    prompt: str | None = Field(None, description="Alias of input for text models.")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="Per-request parameters, checked by the model's engine.")

    def model_input(self) -> Any:
        """The input, from ``input`` or its alias ``prompt``; raises InvalidField if neither or both."""
        from core.errors import InvalidField

        if self.prompt is not None and self.input is not None:
            raise InvalidField("give either input or prompt, not both", model_id=self.model_id,
                               field="prompt")
        value = self.input if self.prompt is None else self.prompt
        if value is None:
            raise InvalidField("input (or prompt) is required", model_id=self.model_id, field="input")
        return value


class InferResponse(BaseModel):
    """Body of a successful ``POST /v1/infer``."""

    model_id: str
    output: Any
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass
class RequestContext:
    """Travels with a request through every node."""

    request_id: str
    model_id: str
    started: float = field(default_factory=time.monotonic)


@dataclass
class EngineResult:
    """What an engine produced for one request (one chunk when streaming, or the whole)."""

    output: Any
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
