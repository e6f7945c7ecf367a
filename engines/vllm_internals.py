"""Every use of vLLM's non-public API, in one place (the vLLM engines' fence; Ray's is
``core/internals.py``).

mmserve needs six things vLLM does not offer publicly (vLLM 0.32.0):

- whether AsyncLLM's engine core has died, and how many requests vLLM's output processor still
  holds (the engine's ``stats``, which the tests use to see that aborted requests leave vLLM);
- vLLM's OpenAI serving layer, built as ``vllm serve`` builds it: its app state from the
  arguments ``vllm serve`` parses (:func:`vllm_serving_state`, :func:`vllm_server_args`), the
  usage context its config is made with (:func:`vllm_usage_context`), and the error body it
  answers an exception with (:func:`vllm_error_response`), checked at start
  (:func:`check_vllm_server`); and the definitions of its server's options beside the public
  engine arguments (:func:`vllm_option_types`, which ``engines.vllm_options`` checks configs by);
- to hand vLLM's speech-to-text layer samples that mmserve's audio node decoded, where it
  takes file bytes and decodes them itself (:func:`vllm_speech_from_samples`), and to read what
  that layer knows of its model: its rate and window (:func:`vllm_speech_clip`), the languages
  it takes (:func:`vllm_check_language`);
- AsyncLLM here and its engine core in a Ray actor (``placement: remote_core``): vLLM's
  handshake with a remote headless core, and the core's own entry point (:func:`vllm_await_core`,
  :func:`vllm_run_core`), checked at start (:func:`check_vllm_remote_core`);
- its LoRA adapters by name, their loading and unloading (:func:`vllm_serving_models`), and a
  fix of its CPU LoRA kernels, which give a base-model token the last adapter in a mixed batch
  (:func:`register_cpu_lora_fix`, a vLLM plugin applied only where the probe finds the bug).

:func:`check_vllm_engine` runs when an engine first opens: if what it reads is not there, a
warning names the installed version and what degrades. What has no fallback (vLLM's serving
layer, its speech-to-text hooks, a remote engine core) raises RuntimeError naming the version
when the model starts. The integration tests exercise these against real vLLM objects;
``tests/unit/test_private_api.py`` keeps every other module of the layers to vLLM's public API.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from core.internals import installed_version, warn_once

# --- AsyncLLM -----------------------------------------------------------------------------------

def check_vllm_engine(llm) -> bool:
    """Whether this vLLM's AsyncLLM exposes what mmserve reads; warns once if not."""
    ok = hasattr(llm, "errored") and hasattr(getattr(llm, "output_processor", None),
                                             "get_num_unfinished_requests")
    if not ok:
        warn_once("vllm-engine", f"vLLM {installed_version('vllm')}: AsyncLLM.errored or "
                  "output_processor.get_num_unfinished_requests is gone; a dead engine core is "
                  "then found by Serve's health check only, and stats() reports no requests")
    return ok


def vllm_errored(llm) -> bool:
    """Whether vLLM's engine core has died (AsyncLLM marks itself errored)."""
    return bool(getattr(llm, "errored", False))


def vllm_unfinished_requests(llm) -> int:
    """Requests vLLM's output processor is still working on (aborted ones leave it)."""
    processor = getattr(llm, "output_processor", None)
    return processor.get_num_unfinished_requests() if processor is not None else 0


# --- vLLM: its OpenAI server's serving layer --------------------------------------------------
# engines.vllm_openai answers the OpenAI-compatible routes with vLLM's own serving objects, which
# vLLM's server builds at its start-up from ``vllm serve``'s parsed arguments; none of the pieces
# that build them is public API.

#: the pieces of vLLM's server that mmserve builds a model's serving layer from, and their modules
_SERVER_PIECES = {
    "init_app_state": "vllm.entrypoints.launchers.api_server.app_state",
    "make_arg_parser": "vllm.entrypoints.launchers.cli_args",
    "FlexibleArgumentParser": "vllm.utils.argparse_utils",
    "create_error_response": "vllm.entrypoints.serve.exception_handling.error_response",
    "UsageContext": "vllm.usage.usage_lib",
    "FrontendArgs": "vllm.entrypoints.launchers.cli_args",
}


def _server_piece(name: str) -> Any:
    import importlib

    module = _SERVER_PIECES[name]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"vLLM {installed_version('vllm')}: {module}.{name} is not there ({err}); mmserve "
                           "cannot build vLLM's OpenAI serving layer (pin the vLLM of the lock file)") from None


def check_vllm_server() -> None:
    """Raise RuntimeError, naming the vLLM version, if this vLLM lacks a piece of its server that
    mmserve builds a model's serving layer from (the model cannot start)."""
    for name in _SERVER_PIECES:
        _server_piece(name)


def vllm_usage_context() -> Any:
    """The usage context ``vllm serve`` makes vLLM's config with (it picks the defaults of what
    the engine arguments leave unset), for an engine's AsyncLLM and its core's actor alike."""
    return _server_piece("UsageContext").OPENAI_API_SERVER


def vllm_server_args(model_path: str, model_id: str, options: dict[str, Any]) -> Any:
    """The arguments ``vllm serve --model model_path --served-model-name model_id`` parses (an
    ``argparse.Namespace``: vLLM's defaults), with ``options`` (engine arguments and server
    options by vLLM's names, as their types, :func:`engines.vllm_options.typed`) set on it as
    ``vllm serve``'s flags would set them."""
    parser = _server_piece("make_arg_parser")(_server_piece("FlexibleArgumentParser")(prog="mmserve"))
    args = parser.parse_args(["--model", model_path, "--served-model-name", model_id])
    for name, value in options.items():
        setattr(args, name, value)
    return args


def vllm_option_types() -> dict[str, tuple[Any, str]]:
    """Every option of this vLLM, by name: ``(its type annotation, "engine" | "server" |
    "both")``. Engine arguments are the fields of ``AsyncEngineArgs`` (public), server options
    those of the dataclass ``vllm serve`` builds its own flags from (not public): what
    ``vllm serve`` takes, less the few flags of its process (``--headless``,
    ``--api-server-count``, ``--config``, ``--grpc``). Raises RuntimeError naming the version
    if this vLLM defines them otherwise."""
    import dataclasses
    import importlib
    import typing

    from vllm.engine.arg_utils import AsyncEngineArgs

    frontend = _server_piece("FrontendArgs")
    # a name vLLM's engine arguments import for type checkers only, which one annotation
    # (quantization_config) refers to
    extra: dict[str, Any] = {}
    try:
        from vllm.config.quantization import QuantizationConfigArgs
        extra["QuantizationConfigArgs"] = QuantizationConfigArgs
    except ImportError:
        pass
    found: dict[str, tuple[Any, str]] = {}
    for cls, where in ((AsyncEngineArgs, "engine"), (frontend, "server")):
        module = importlib.import_module(cls.__module__)
        try:
            hints = typing.get_type_hints(cls, globalns=vars(module), localns=extra)
        except (NameError, TypeError) as err:
            raise RuntimeError(f"vLLM {installed_version('vllm')}: the options of {cls.__name__} "
                               f"cannot be read ({err}); pin the vLLM of the lock file") from None
        for field in dataclasses.fields(cls):
            if field.name.startswith("_"):
                continue
            where_now = "both" if field.name in found else where
            found[field.name] = (hints[field.name], where_now)
    return found


async def vllm_serving_state(llm, args) -> Any:
    """vLLM's app state over ``llm`` (a starlette ``State``: ``openai_serving_chat``,
    ``openai_serving_transcription``...), built by vLLM's server start-up from ``args``
    (:func:`vllm_server_args`). Raises RuntimeError naming the vLLM version where a piece is
    missing (:func:`check_vllm_server`)."""
    from starlette.datastructures import State

    check_vllm_server()
    state = State()
    await _server_piece("init_app_state")(llm, state, args, supported_tasks=await llm.get_supported_tasks())
    missing = [name for name in _STATE_NAMES if not hasattr(state, name)]
    if missing:
        raise RuntimeError(f"vLLM {installed_version('vllm')}: its server's app state has no "
                           f"{', '.join(missing)}; mmserve cannot serve its OpenAI-compatible routes "
                           "(pin the vLLM of the lock file)")
    return state


#: what mmserve reads of the app state vLLM's server start-up builds, besides the route handlers
#: (which a model has only for the tasks it supports: :func:`vllm_route_handler`)
_STATE_NAMES = ("openai_serving_models", "vllm_config")


async def vllm_model_cards(state) -> list[dict[str, Any]]:
    """vLLM's ``/v1/models`` entries for the model of ``state`` (:func:`vllm_serving_state`)."""
    cards = await state.openai_serving_models.show_available_models()
    return [card.model_dump() for card in cards.data]


def vllm_serving_models(state) -> Any:
    """vLLM's ``OpenAIServingModels`` of ``state``: the model's names, its LoRA adapters, and
    their loading and unloading."""
    return state.openai_serving_models


def vllm_loras(state) -> dict[str, Any]:
    """The LoRA adapters vLLM's serving layer of ``state`` knows, by name (its ``LoRARequest``s:
    what a request naming one generates with)."""
    return vllm_serving_models(state).lora_requests


def vllm_is_multimodal(state) -> bool:
    """Whether the model of ``state`` takes media (vLLM's model config says)."""
    return bool(state.vllm_config.model_config.is_multimodal_model)


def vllm_route_handler(state, name: str) -> Any | None:
    """vLLM's serving object ``name`` (``openai_serving_chat``...) of ``state``, or None where
    the model does not support the route's task (vLLM's server then leaves it unset)."""
    return getattr(state, name, None)


def vllm_raw_request(headers: dict[str, str]) -> Any:
    """What vLLM's serving handlers read of the HTTP request they are given (``raw_request``):
    its ``headers`` (``traceparent``/``tracestate`` for vLLM's span of the request, and the
    optional ``X-Request-Id``, ``X-Session-ID``... which this leaves out) and a ``state`` they
    write to; vLLM 0.32 reads nothing else of it on the routes mmserve calls."""
    from types import SimpleNamespace

    return SimpleNamespace(headers=dict(headers), state=SimpleNamespace())


def vllm_error_response(err: BaseException) -> Any:
    """vLLM's ``ErrorResponse`` for an exception its serving layer raised: the status, message
    and parameter vLLM's server would answer it with."""
    return _server_piece("create_error_response")(err)


# --- vLLM: its speech-to-text layer -----------------------------------------------------------

def vllm_speech_clip(serving) -> tuple[int, float | None]:
    """``(sample_rate, max_audio_clip_s)`` of vLLM's speech-to-text serving object: the rate its
    model takes, and the longest window it hears at once (None: no limit)."""
    config = serving.asr_config
    return int(config.sample_rate), config.max_audio_clip_s


def vllm_check_language(serving, language: str | None) -> None:
    """Raise ValueError, in vLLM's words, if the speech model does not take ``language`` (an ISO
    639-1 code; None: the model detects it)."""
    serving.model_cls.validate_language(language)


def vllm_speech_from_samples(serving, split) -> None:
    """Make vLLM's transcription or translation layer (``SpeechToTextBaseServing``) take a 1-D
    float array of samples at its model's rate where it takes the file's bytes: its decode step
    (``_decode_and_chunk_speech_async``, bytes -> windows) is replaced by the windowing alone:
    audio over the model's ``max_audio_clip_s`` is cut by ``await split(audio, sample_rate,
    max_audio_clip_s)`` (a list of consecutive windows). vLLM's size check reads the array's
    length as bytes (its limit, 25 MB, is 1,600 s of 16 kHz samples). Raises RuntimeError naming
    the vLLM version where the step, or what :func:`vllm_speech_clip` and
    :func:`vllm_check_language` read, is not there: the engine cannot start (vLLM would decode
    the samples as a file)."""
    import numpy as np

    if (not hasattr(serving, "_decode_and_chunk_speech_async") or not hasattr(serving, "asr_config")
            or not hasattr(getattr(serving, "model_cls", None), "validate_language")):
        raise RuntimeError(f"vLLM {installed_version('vllm')}: its speech-to-text serving has no "
                           "_decode_and_chunk_speech_async, asr_config or model_cls.validate_language; "
                           "mmserve cannot hand it decoded audio (pin the vLLM of the lock file)")
    config = serving.asr_config

    async def windows(audio: np.ndarray) -> tuple[list[np.ndarray], float]:
        duration = audio.shape[-1] / config.sample_rate
        if config.max_audio_clip_s is None or duration <= config.max_audio_clip_s:
            return [audio], duration
        return await split(audio, int(config.sample_rate), config.max_audio_clip_s), duration

    serving._decode_and_chunk_speech_async = windows


# --- vLLM: an engine core placed elsewhere ---------------------------------------------------
# ``placement: remote_core`` (engines.vllm_core): AsyncLLM in this process reaches an engine core
# that a Ray actor runs, over vLLM's own ZMQ protocol. vLLM does this for ``vllm serve
# --headless`` engines on other nodes; the pieces it is built of are not public API.

def check_vllm_remote_core() -> None:
    """Raise RuntimeError, naming the vLLM version, if this vLLM lacks what an engine core of
    its own needs (the placement cannot work then: use ``placement: engine``)."""
    import inspect

    try:
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.core import EngineCoreProc  # noqa: F401
        from vllm.v1.engine.utils import CoreEngine, wait_for_engine_startup  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"vLLM {installed_version('vllm')}: no headless engine core ({err}); "
                           "use placement engine") from None
    if "client_addresses" not in inspect.signature(AsyncLLM.from_vllm_config).parameters:
        raise RuntimeError(f"vLLM {installed_version('vllm')}: AsyncLLM takes no client_addresses; "
                           "use placement engine")
    try:
        from vllm.v1.engine.utils import CoreEngineLaunch  # noqa: F401 (0.32: the handshake's resources)
    except ImportError:
        raise RuntimeError(f"vLLM {installed_version('vllm')}: its engine handshake is not the one mmserve "
                           "knows (vllm.v1.engine.utils.CoreEngineLaunch); use placement engine") from None


def vllm_core_addresses(host: str) -> tuple[str, Any, dict[str, str]]:
    """Fresh TCP addresses on ``host`` (this process's node) for one engine core: the handshake
    address it connects to, vLLM's ``EngineZmqAddresses`` it is sent in the handshake, and the
    ``client_addresses`` that AsyncLLM binds."""
    from vllm.utils.network_utils import get_open_port, get_tcp_uri
    from vllm.v1.engine.utils import EngineZmqAddresses

    handshake, inputs, outputs = (get_tcp_uri(host, get_open_port()) for _ in range(3))
    addresses = EngineZmqAddresses(inputs=[inputs], outputs=[outputs])
    return handshake, addresses, {"input_address": inputs, "output_address": outputs}


def vllm_await_core(handshake: str, addresses, vllm_config, gone_fd: int) -> None:
    """Block until the engine core has connected to ``handshake`` and is ready (vLLM's own
    handshake, for a remote headless core), sending it ``addresses``. Raises RuntimeError as
    soon as ``gone_fd`` is readable (the core's host is gone), as vLLM does when a local
    engine process exits during start-up."""
    import copy

    import zmq
    from vllm.v1.engine.utils import CoreEngine, CoreEngineLaunch, wait_for_engine_startup

    class Gone:  # what vLLM's handshake watches of a frontend process: readable once it is gone
        name = "engine core actor"
        sentinel = gone_fd
        exitcode = None

    parallel = copy.copy(vllm_config.parallel_config)
    parallel.data_parallel_size_local = 0  # the one engine is remote
    launch = CoreEngineLaunch(engine_manager=None, coordinator=None, addresses=addresses,
                              tensor_queue=None, watched_frontend_processes=[Gone()])
    ctx = zmq.Context()
    socket = ctx.socket(zmq.ROUTER)
    try:
        socket.bind(handshake)
        wait_for_engine_startup(socket, [CoreEngine(index=0, local=False)], parallel, False,
                                vllm_config.cache_config, launch)
    finally:
        socket.close(linger=0)
        ctx.term()


def vllm_import_core() -> None:
    """Import what :func:`vllm_run_core` runs (tens of seconds of CPU on a small machine), so
    that a core's actor can do it while its frontend is still starting."""
    import vllm.v1.engine.core  # noqa: F401
    import vllm.v1.executor  # noqa: F401


def vllm_run_core(vllm_config, handshake: str) -> None:
    """Run vLLM's engine core in this process for a frontend elsewhere (a remote headless core,
    as ``vllm serve --headless`` starts one, or vLLM's own engine core actor): connect to
    ``handshake``, load the model, serve until stopped. Blocks; raises if the core fails."""
    from vllm.v1.engine.core import EngineCoreProc
    from vllm.v1.executor import Executor

    EngineCoreProc.run_engine_core(vllm_config=vllm_config, local_client=False, handshake_address=handshake,
                                   executor_class=Executor.get_class(vllm_config), log_stats=True,
                                   dp_rank=0, local_dp_rank=0)


# --- vLLM: a fix of its CPU LoRA kernels ------------------------------------------------------
#
# A vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml: vLLM loads it
# in each of its processes, the workers that run the model included). vLLM's CPU kernels
# (``vllm.lora.ops.torch_ops``) gather each token's adapter weights with its adapter slot as an
# index, and a token without an adapter has slot -1: Python's last slot. A batch that mixes
# base-model requests with adapter requests then adds the last slot's adapter to the base
# model's tokens (with ``max_loras: 1``, the one adapter loaded): the base model answers as the
# adapter would. Open upstream (vllm-project/vllm#48421, #49656); vLLM's GPU kernels skip -1.
# Seen here: the tiny Llama's base requests batched with its adapter's answered the adapter's
# greedy text (tests/integration/vllm/test_lora.py).
#
# The fix wraps the three ``bgmv`` kernels (the ``sgmv`` ones call them): rows of slot -1 are
# computed with slot 0 and then given back what they held (added to) or zero (assigned), so
# that they get no adapter; a batch of which no token has an adapter (vLLM runs the decode
# kernels for it all the same) computes nothing. It applies only where mmserve's engines run vLLM (the variable
# below, set by ``engines.vllm_core``; vLLM's own server in the benchmarks is left as vLLM
# ships it), only on the CPU, and only if a probe of the kernel shows the bug: a vLLM that
# fixed it is left alone.

#: set to 1 in the processes of mmserve's vLLM engines (and so in vLLM's workers, their children)
CPU_LORA_FIX = "MMSERVE_VLLM_CPU_LORA_FIX"

def register_cpu_lora_fix() -> None:
    """vLLM's plugin hook: wrap the CPU LoRA kernels if they alias slot -1 (see the module)."""
    if os.environ.get(CPU_LORA_FIX) != "1":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import importlib

    from vllm.lora.ops.torch_ops import lora_ops

    if getattr(lora_ops.bgmv_shrink, "mmserve_fixed", False) or not aliases_last_slot(lora_ops.bgmv_shrink):
        return
    fixed = {"bgmv_shrink": _shrink(lora_ops.bgmv_shrink), "bgmv_expand": _expand(lora_ops.bgmv_expand),
             "bgmv_expand_slice": _expand_slice(lora_ops.bgmv_expand_slice)}
    for module in ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops",
                   "vllm.lora.punica_wrapper.punica_cpu"):
        target = importlib.import_module(module)
        for name, fn in fixed.items():
            if hasattr(target, name):
                setattr(target, name, fn)
    logging.getLogger("mmserve.vllm").info("vLLM's CPU LoRA kernels: tokens without an adapter no longer take the last slot's "
                "(vllm-project/vllm#48421)")


def aliases_last_slot(bgmv_shrink: Callable[..., Any]) -> bool:
    """Whether ``bgmv_shrink`` gives a token of slot -1 the last slot's adapter."""
    import torch

    out = torch.zeros(1, 2)
    bgmv_shrink(torch.ones(1, 2), torch.ones(1, 1, 2, 2), out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _marked(fn: Callable[..., None], kernel: Callable[..., None]) -> Callable[..., None]:
    fn.mmserve_fixed = True  # type: ignore[attr-defined]
    fn.__wrapped__ = kernel  # type: ignore[attr-defined]
    return fn


def _shrink(kernel: Callable[..., None]) -> Callable[..., None]:
    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
        none = lora_indices_tensor < 0
        if not bool(none.any()) or none.shape[0] != output_tensor.shape[0]:
            return kernel(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        if bool(none.all()):  # no token has an adapter: nothing to compute
            output_tensor[:, : lora_a_weights.shape[-2]] = 0
            return None
        kernel(inputs, lora_a_weights, output_tensor, lora_indices_tensor.clamp(min=0), scaling)
        output_tensor[none, : lora_a_weights.shape[-2]] = 0
    return _marked(bgmv_shrink, kernel)


def _expand(kernel: Callable[..., None]) -> Callable[..., None]:
    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
        none = lora_indices_tensor < 0
        if not bool(none.any()) or none.shape[0] != output_tensor.shape[0]:
            return kernel(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        if bool(none.all()):  # no token has an adapter: nothing to add
            if not add_inputs:
                output_tensor[:, : min(lora_b_weights.shape[-2], output_tensor.shape[1])] = 0
            return None
        held = output_tensor[none].clone()
        kernel(inputs, lora_b_weights, output_tensor, lora_indices_tensor.clamp(min=0), add_inputs)
        if add_inputs:
            output_tensor[none] = held
        else:
            output_tensor[none, : min(lora_b_weights.shape[-2], output_tensor.shape[1])] = 0
    return _marked(bgmv_expand, kernel)


def _expand_slice(kernel: Callable[..., None]) -> Callable[..., None]:
    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                          slice_size: int, add_inputs: bool = True):
        none = lora_indices_tensor < 0
        if not bool(none.any()) or none.shape[0] != output_tensor.shape[0]:
            return kernel(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                          slice_size, add_inputs)
        if bool(none.all()):  # no token has an adapter: nothing to add
            if not add_inputs:
                output_tensor[:, slice_offset: slice_offset + slice_size] = 0
            return None
        held = output_tensor[none].clone()
        kernel(inputs, lora_b_weights, output_tensor, lora_indices_tensor.clamp(min=0), slice_offset,
               slice_size, add_inputs)
        if add_inputs:
            output_tensor[none] = held
        else:
            output_tensor[none, slice_offset: slice_offset + slice_size] = 0
    return _marked(bgmv_expand_slice, kernel)
