"""Audio preprocessing: bytes → decoded (FFmpeg through torchcodec, as ``torchaudio.load`` does) →
mono → resampled with torchaudio to the model's rate, within the configured limits."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from core.errors import InvalidField
from core.protocol import MediaPayload, RequestContext
from nodes.base import Node
from nodes.media import MediaKwargs, check_codec, decode_failed, media_bytes


class AudioKwargs(MediaKwargs):
    formats: list[str] = Field(["wav", "flac", "mp3", "ogg"], min_length=1)
    sample_rate: int = Field(16000, ge=1000, le=192000, description="The model's sample rate.")
    max_seconds: float = Field(600.0, gt=0, description="Longer audio gets 422.")
    reject_silence: bool = Field(False, description="Refuse (422) audio whose every sample is 0.")


class AudioDecode(Node):
    """Decodes WAV, FLAC, MP3 or OGG into a mono float waveform at ``sample_rate``.

    Only the first ``max_seconds`` (plus a margin) are ever decoded, so a small file that
    expands to hours of audio costs no more than the limit before it is refused.
    """

    requires = ("torch", "torchaudio", "torchcodec.decoders")  # torchcodec loads FFmpeg's libraries

    Kwargs = AudioKwargs
    kwargs: AudioKwargs  # Node.__init__ validates them with Kwargs

    async def __call__(self, payload: Any, ctx: RequestContext) -> MediaPayload:
        data, _ = media_bytes(payload, self.kwargs, "audio", ctx.model_id)
        return await asyncio.to_thread(self.decode, data, ctx.model_id)

    def decode(self, data: bytes, model_id: str) -> MediaPayload:
        import torch
        import torchaudio.functional as F
        from torchcodec.decoders import AudioDecoder

        kw = self.kwargs
        try:
            decoder = AudioDecoder(data)
            check_codec(decoder.metadata.codec, kw, "audio", model_id)
            samples = decoder.get_samples_played_in_range(0.0, kw.max_seconds + 1.0)
        except (RuntimeError, ValueError) as err:
            raise decode_failed(err, "audio", kw, model_id) from None
        wave, rate = samples.data, samples.sample_rate
        duration = wave.shape[-1] / rate
        if wave.numel() == 0:
            raise InvalidField("input.data: the audio has no samples", model_id=model_id, field="input.data")
        if duration > kw.max_seconds:
            raise InvalidField(f"input.data: the audio is longer than this model's limit of "
                               f"{kw.max_seconds:g} s (max_seconds)", model_id=model_id, field="input.data")
        if kw.reject_silence and not bool(wave.abs().max() > 0):
            raise InvalidField("input.data: the audio is silent (every sample is 0); nothing to transcribe",
                               model_id=model_id, field="input.data")
        mono = wave.mean(dim=0) if wave.dim() == 2 else wave
        if rate != kw.sample_rate:
            mono = F.resample(mono, rate, kw.sample_rate)
        return MediaPayload(data=mono.to(torch.float32).contiguous(),
                            info={"duration_s": round(duration, 3), "sample_rate": kw.sample_rate})
