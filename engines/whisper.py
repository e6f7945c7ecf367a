"""Speech to text on vLLM: Whisper-family checkpoints (encoder-decoder) served by vLLM's own
transcription and translation layer (``vllm.entrypoints.speech_to_text``) over the engine's
AsyncLLM.

The audio preprocess node has already decoded and resampled the upload (every format the audio
pipelines take); vLLM's layer gets those samples instead of file bytes, and does the rest as
``vllm serve`` does: the language (detected by the model when not given), the decoder prompt,
one engine request per 30 s window run at once, the texts joined, and ``verbose_json``'s
segments from Whisper's timestamp tokens. Two things mmserve does instead: it cuts audio longer
than a window itself (``engines.speech_windows``: in the pauses Silero VAD finds, else at the
quietest 100 ms of the window's last second, as vLLM would), and it places each window's
segments at the window's true offset (vLLM counts 30 s a window). ``srt`` and ``vtt``, which
vLLM's server refuses, are asked of vLLM as ``verbose_json`` and rendered from its segments by
the ``transcript`` postprocess node.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import threading
from typing import AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InvalidField, InvalidParameter, MMServeError
from core.protocol import EngineResult, MediaPayload, RequestContext
from engines import vllm_internals
from engines.vllm import VLLMBase, VLLMKwargs
from engines.vllm_openai import error_of

#: response formats vLLM's layer renders itself; the others come from its verbose_json
VLLM_FORMATS = ("json", "text", "verbose_json")

#: Where the request being transcribed in this context gets its windows' offsets (each window's
#: first sample): :meth:`VLLMTranscriber._transcribe` sets a list here before it calls vLLM, and
#: :meth:`VLLMTranscriber._split`, which vLLM calls during that call, fills it. A task that vLLM
#: starts meanwhile inherits the context, so it fills the same list. The offsets travel with the
#: request, not with the array: vLLM may copy the samples on their way to the split.
WINDOW_OFFSETS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "mmserve_whisper_window_offsets", default=None)


def _segment_granularity() -> list[Literal["segment"]]:
    return ["segment"]


class TranscriptionParams(BaseModel):
    """Per-request parameters of speech-to-text models, on ``/v1/infer`` and as the form fields of
    ``/v1/audio/transcriptions`` and ``/v1/audio/translations``. Each but ``task`` is the field of
    that name of vLLM's ``TranscriptionRequest``, with vLLM's meaning (a unit test keeps them
    in step with the pinned vLLM)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["transcribe", "translate"] = Field("transcribe", description=(
        "transcribe: text in the spoken language; translate: English text (Whisper's tasks)."))
    language: str | None = Field(None, description=(
        "ISO 639-1 code of the spoken language; detected by the model when not given."))
    prompt: str = Field("", description="Text to guide the style, or to continue a previous window.")
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    temperature: float = Field(0.0, ge=0, le=1, description="0 is greedy.")
    timestamp_granularities: list[Literal["segment"]] = Field(default_factory=_segment_granularity)
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens per 30 s window.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)


@functools.cache
def not_in_translation() -> frozenset[str]:
    """The parameters the pinned vLLM's TranslationRequest lacks (a translation that sets one is
    refused); read from vLLM's own models, so the set follows the pin (vLLM 0.32 translations
    take the sampling parameters, 0.25 did not)."""
    from vllm.entrypoints.speech_to_text.translation.protocol import TranslationRequest

    return frozenset(TranscriptionParams.model_fields) - {"task"} - set(TranslationRequest.model_fields)


class SpeechKwargs(VLLMKwargs):
    """``engine_kwargs`` of a speech-to-text model on vLLM: vLLM's, and where to cut long audio."""

    split_on_silence: bool = Field(True, description=(
        "Cut audio longer than a window in the pauses Silero VAD finds (its weights ship in the "
        "silero-vad package); false, or where it finds none: at the quietest 100 ms of the "
        "window's last second, as vLLM does."))


class VLLMTranscriber(VLLMBase[TranscriptionParams]):
    """A speech-to-text model (Whisper) on vLLM. ``/v1/infer`` takes the audio pipeline's
    samples and answers vLLM's transcription body (``{"text", "usage"}``, or with
    ``verbose_json`` also ``language``, ``duration`` and ``segments``)."""

    Kwargs = SpeechKwargs
    Params = TranscriptionParams
    requires = (*VLLMBase.requires, "silero_vad")

    @classmethod
    def served_routes(cls, model) -> frozenset[str]:
        return frozenset({"transcription", "translation"})

    async def start(self) -> None:
        self._vad = None
        self._vad_lock = threading.Lock()  # one Silero model; it keeps state within a clip
        if self.kwargs.split_on_silence:
            from engines.vad import load_silero

            self._vad = load_silero()
        await super().start()

    async def _opened(self) -> None:
        state = self.frontend.state
        self.serving = {"transcribe": state.openai_serving_transcription,
                        "translate": state.openai_serving_translation}
        for serving in self.serving.values():
            vllm_internals.vllm_speech_from_samples(serving, self._split)

    async def _split(self, audio, rate: int, clip_s: float) -> list:
        """``audio`` (at ``rate``) cut into windows of at most ``clip_s`` seconds
        (:func:`engines.speech_windows.plan`); their offsets go to the request's
        :data:`WINDOW_OFFSETS`, for its segments."""
        import numpy as np

        from engines.speech_windows import plan

        speech = await asyncio.to_thread(self._speech, audio, rate) if self._vad is not None else []
        cuts = plan(audio, int(clip_s * rate), speech, rate)
        offsets = WINDOW_OFFSETS.get()
        if offsets is not None:
            offsets[:] = [0, *cuts]
        return np.split(audio, cuts)

    def _speech(self, audio, rate: int) -> list[tuple[int, int]]:
        import torch
        from silero_vad import get_speech_timestamps

        with self._vad_lock:
            spans = get_speech_timestamps(torch.from_numpy(audio), self._vad, sampling_rate=rate)
        return [(s["start"], s["end"]) for s in spans]

    @staticmethod
    def _place(segments: list[dict], offsets: list[int], rate: float, clip_s: float) -> None:
        """Move each window's segments from vLLM's offset (``seek``: 30 s a window) to the
        window's own (``seek`` in whole seconds, as vLLM writes it)."""
        for seg in segments:
            i = round(seg["seek"] / clip_s)
            if i < len(offsets):
                shift = offsets[i] / rate - i * clip_s
                seg["start"] = round(seg["start"] + shift, 3)
                seg["end"] = round(seg["end"] + shift, 3)
                seg["seek"] = int(offsets[i] / rate)

    def infer(self, inputs: MediaPayload, params: TranscriptionParams,
              ctx: RequestContext) -> AsyncIterator[EngineResult]:
        return self._guarded(self._transcribe(inputs, params, ctx), ctx)

    def _request(self, params: TranscriptionParams, model_id: str):
        """vLLM's request model of ``params.task`` (its ``file`` is a placeholder: the samples
        are passed beside it)."""
        from starlette.datastructures import UploadFile

        fields = params.model_dump(exclude={"task"}, exclude_none=True)
        if fields["response_format"] not in VLLM_FORMATS:
            fields["response_format"] = "verbose_json"
        if params.task == "translate":
            from vllm.entrypoints.speech_to_text.translation.protocol import TranslationRequest as Request

            for name in sorted(not_in_translation()):
                if name in params.model_fields_set:
                    raise InvalidParameter(f"{name}: not a translation parameter (vLLM's translations "
                                           f"do not take it)", model_id=model_id, field=name)
                fields.pop(name, None)
        else:
            from vllm.entrypoints.speech_to_text.transcription.protocol import (
                TranscriptionRequest as Request)
        return Request.model_validate({**fields, "model": model_id,
                                       "file": UploadFile(io.BytesIO(b""), filename="audio")})

    async def _transcribe(self, inputs: MediaPayload, params: TranscriptionParams,
                          ctx: RequestContext) -> AsyncIterator[EngineResult]:
        import torch

        serving = self.serving[params.task]
        rate, clip_s = vllm_internals.vllm_speech_clip(serving)
        if inputs.info.get("sample_rate") != rate:
            raise InvalidField(f"the model takes {rate:g} Hz audio, not {inputs.info.get('sample_rate')} Hz: "
                               f"set the pipeline's sample_rate", model_id=ctx.model_id)
        try:
            vllm_internals.vllm_check_language(serving, params.language)
        except ValueError as err:
            raise InvalidParameter(f"language: {err}", model_id=ctx.model_id, field="language") from None
        request = self._request(params, ctx.model_id)
        audio = inputs.data.to(torch.float32).numpy() if isinstance(inputs.data, torch.Tensor) else inputs.data
        call = (serving.create_transcription if params.task == "transcribe" else serving.create_translation)
        offsets: list[int] = []  # filled by _split if vLLM cuts the audio into windows
        token = WINDOW_OFFSETS.set(offsets)
        try:
            raw = None if ctx.trace is None else vllm_internals.vllm_raw_request(ctx.trace)  # vLLM's spans under ours
            answer = await call(audio, request, raw)
        except MMServeError:
            raise
        except Exception as err:
            raise error_of(err, ctx.model_id) from None
        finally:
            WINDOW_OFFSETS.reset(token)
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if isinstance(answer, ErrorResponse):
            raise error_of(answer, ctx.model_id)
        out = answer.model_dump(exclude_none=True)
        if offsets and clip_s is not None and out.get("segments"):  # offsets: vLLM cut windows
            self._place(out["segments"], offsets, rate, clip_s)
        yield EngineResult(output=out, finish_reason="stop", info=inputs.info)

