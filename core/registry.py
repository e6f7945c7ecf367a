"""Names that configs may use for engines and nodes, mapped to the classes they build.

Configs name things (``engine: echo``, ``preprocess: {name: identity}``) rather than import
paths, so that only this project's own classes can be built from a config file. Classes are
imported lazily: naming ``vllm`` here imports nothing heavy until a replica starts the engine.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from core.config import ModelConfig
    from engines.base import Engine
    from nodes.base import Node

T = TypeVar("T")

ENGINES: dict[str, str] = {
    "echo": "engines.echo:EchoEngine",
    "vllm": "engines.vllm:VLLMEngine",
    "vllm_embedding": "engines.vllm:VLLMEmbedder",
    "vllm_speech": "engines.whisper:VLLMTranscriber",
    "silero_vad": "engines.vad:SileroVAD",
    "ctc_asr": "engines.asr:CTCSpeechRecognizer",
    "image_classifier": "engines.classifier:ImageClassifier",
    "video_classifier": "engines.classifier:VideoClassifier",
}

NODES: dict[str, str] = {
    "identity": "nodes.common:Identity",
    "result": "nodes.common:Result",
    "text_prompt": "nodes.text:TextPrompt",
    "chat_media": "nodes.chat_media:ChatMedia",
    "audio_decode": "nodes.audio:AudioDecode",
    "image_decode": "nodes.vision:ImageDecode",
    "video_frames": "nodes.video:VideoFrames",
    "media_result": "nodes.media:MediaResult",
    "transcript": "nodes.transcript:Transcript",
}


def _load(table: dict[str, str], kind: str, name: str) -> type:
    try:
        module, attr = table[name].split(":")
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}") from None
    return getattr(importlib.import_module(module), attr)


def engine_class(name: str) -> type["Engine"]:
    """The engine class registered as ``name``; raises ``KeyError`` naming the known ones."""
    return _load(ENGINES, "engine", name)


def engine_of(model: "ModelConfig") -> type["Engine"]:
    """The class of ``model``'s engine, once :func:`core.validate.validate_config` has set an
    engine the model leaves out to its pipeline's. Raises ``ValueError`` for a model whose engine
    is still unset (not validated), ``KeyError`` for an unknown one."""
    if model.engine is None:
        raise ValueError(f"model {model.model_id!r} names no engine; validate_config sets its pipeline's")
    return engine_class(model.engine)


def node_class(name: str) -> type["Node"]:
    """The node class registered as ``name``; raises ``KeyError`` naming the known ones."""
    return _load(NODES, "node", name)


def engine_options_of(model: "ModelConfig", expected: type) -> Any:
    """``model``'s engine options (``engine_kwargs`` as its engine's ``Kwargs``), which must
    have what ``expected`` (a runtime-checkable ``Protocol`` of :mod:`core.protocol`) names:
    how a node reads them without knowing the engine. Raises TypeError naming the engine and
    what it lacks (validation finds it first: ``Node.engine_options``)."""
    options = model.options(engine_of(model).Kwargs)
    if not isinstance(options, expected):
        raise TypeError(f"engine {model.engine!r} has no options {expected.__name__} names "
                        f"({', '.join(expected.__annotations__)})")
    return options


# Python's imports from several threads at once break large packages: an ingress starting
# models in threads saw "cannot import name ... from partially initialized module
# 'torch._inductor.utils'" and transformers' "Could not import module 'AutoTokenizer'".
_IMPORTING = threading.Lock()


async def off_loop_importing(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread, so that the event loop serves meanwhile, one such call at a
    time in this process: work that imports what a model needs (a step's import check, an
    engine's backend and its config)."""
    def locked() -> T:
        with _IMPORTING:
            return fn(*args)

    return await asyncio.to_thread(locked)
