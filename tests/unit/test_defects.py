"""Regression tests of defects that need neither Ray nor a running vLLM engine (issue 35):
Whisper's window offsets must reach the request's segments however vLLM handles the samples."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from core.config import ModelConfig
from core.protocol import MediaPayload, RequestContext

RATE = 16000
CLIP_S = 30.0


class CopyingSpeechServing:
    """Stands in for vLLM's speech-to-text serving object (``SpeechToTextBaseServing``): the
    layout ``engines.vllm_internals`` reads of it, and a ``create_transcription`` that, as a vLLM is
    free to, copies the samples before cutting them, cuts them in a task of its own, and
    answers one segment per window at vLLM's offset (30 s a window, ``seek`` in seconds)."""

    def __init__(self) -> None:
        self.asr_config = SimpleNamespace(sample_rate=RATE, max_audio_clip_s=CLIP_S)
        self.model_cls = SimpleNamespace(validate_language=lambda language: language)

    async def _decode_and_chunk_speech_async(self, audio_data: bytes):  # replaced by mmserve
        raise AssertionError("vLLM's own decoding must not run: mmserve hands it samples")

    async def create_transcription(self, audio, request, raw_request):
        copied = np.array(audio, copy=True)
        windows, duration = await asyncio.create_task(self._decode_and_chunk_speech_async(copied))
        segments = [{"id": i, "seek": int(i * CLIP_S), "start": i * CLIP_S + 1.0, "end": i * CLIP_S + 2.0,
                     "text": f"window {i}"} for i in range(len(windows))]
        return SimpleNamespace(model_dump=lambda **kw: {"text": "", "duration": duration, "language": "en",
                                                        "segments": segments})


def test_whisper_places_each_windows_segments_at_its_offset_though_vllm_copies_the_samples():
    """The offsets of the windows mmserve cuts travel with the request (not with the array's
    identity, which a copy in vLLM loses): the second window's segment lands at that window's
    true start, not at vLLM's 30 s."""
    from engines.whisper import TranscriptionParams, VLLMTranscriber

    engine = VLLMTranscriber(ModelConfig(model_id="w", modality="audio", pipeline="speech",
                                         engine="vllm_speech", engine_kwargs={"split_on_silence": False}))
    engine._vad = None  # start() would load Silero VAD; split_on_silence is off
    state = SimpleNamespace(openai_serving_transcription=CopyingSpeechServing(),
                            openai_serving_translation=CopyingSpeechServing())
    engine.frontend = SimpleNamespace(state=state)

    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, int(50 * RATE)).astype(np.float32)
    audio[int(29.5 * RATE):int(29.6 * RATE)] = 0.0  # the quietest 100 ms of the first window's last second
    payload = MediaPayload(data=audio, info={"sample_rate": RATE, "duration_s": 50.0})
    ctx = RequestContext(request_id="r", model_id="w")

    async def transcribe():
        await engine._opened()
        results = [r async for r in engine.infer(payload, TranscriptionParams(response_format="verbose_json"), ctx)]
        return results[0].output["segments"]

    first, second = asyncio.run(transcribe())
    assert (first["start"], first["end"]) == (1.0, 2.0)
    assert second["start"] == pytest.approx(29.55 + 1.0, abs=0.001), second  # cut mid-pause, at 29.55 s
    assert second["seek"] == 29
