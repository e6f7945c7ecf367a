"""The contract of pre/postprocess nodes.

A node is built cheaply from its validated kwargs and the model it serves, does any heavy
set-up in :meth:`Node.start`, and handles each request with one async call. The same object
runs inside the ingress replica or in a deployment of its own: placement is configuration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import BaseModel

from core.config import ModelConfig
from core.protocol import NoOptions, RequestContext


class Node(ABC):
    """Base of preprocess and postprocess nodes; ``Kwargs`` is the schema of their kwargs."""

    Kwargs: ClassVar[type[BaseModel]] = NoOptions
    #: modules the node imports when it runs; the process hosting it checks them at start
    requires: ClassVar[tuple[str, ...]] = ()
    #: the engine options the node reads (a ``Protocol`` of :mod:`core.protocol`, through
    #: :func:`core.registry.engine_options_of`); validation refuses a model whose engine lacks them
    engine_options: ClassVar[type | None] = None

    def __init__(self, kwargs: dict[str, Any], model: ModelConfig) -> None:
        self.kwargs = self.Kwargs.model_validate(kwargs)
        self.model = model

    async def start(self) -> None:
        """Heavy one-time set-up (tokenizers, transforms). Called once before any request."""

    @abstractmethod
    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        """Transform one request's payload; raises ``core.errors.MMServeError`` on bad input."""
