"""Voice activity detection with Silero VAD: the real weights shipped inside the ``silero-vad``
PyPI package (TorchScript), so it runs offline as it would anywhere."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.protocol import MediaPayload
from engines.batching import BatchedEngine

SAMPLE_RATES = (8000, 16000)


class VADParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.5, gt=0, lt=1, description="Speech probability above which a window is speech.")
    min_speech_duration_ms: int = Field(250, ge=0, le=60_000, description="Shorter speech is dropped.")
    min_silence_duration_ms: int = Field(100, ge=0, le=60_000, description="Shorter pauses do not split.")
    speech_pad_ms: int = Field(30, ge=0, le=5_000, description="Padding added to each segment's ends.")


def load_silero(source: str | None = None):
    """Silero VAD's TorchScript model at ``source``: a ``.jit`` file, or a directory holding
    ``silero_vad.jit``; by default the package's own (``package:silero_vad/data``)."""
    from pathlib import Path

    from silero_vad.utils_vad import init_jit_model

    from engines.checkpoints import resolve_source

    path = Path(resolve_source(source or "package:silero_vad/data"))
    return init_jit_model(str(path / "silero_vad.jit" if path.is_dir() else path))


class SileroVAD(BatchedEngine[VADParams]):
    """``{"segments": [{"start_s", "end_s"}, ...]}`` of the speech in a 8 or 16 kHz waveform.

    Silero keeps state across the windows of one clip, so a batch runs its clips one after the
    other on the one model (batching still saves the per-request hops and thread switches), and
    one batch runs at a time.
    """

    requires = ("torch", "silero_vad")
    max_instances = 1

    Params = VADParams

    def load(self) -> None:
        """The model at ``source`` (:func:`load_silero`)."""
        self.vad = load_silero(self.model.source)

    def run_batch(self, items: list[tuple[MediaPayload, VADParams]]) -> list[Any]:
        from silero_vad import get_speech_timestamps

        from core.errors import InvalidField

        out: list[dict[str, Any] | InvalidField] = []
        for media, p in items:
            rate = media.info["sample_rate"]
            if rate not in SAMPLE_RATES:
                out.append(InvalidField(f"Silero VAD takes 8 or 16 kHz audio, not {rate} Hz: set the "
                                        f"pipeline's sample_rate", model_id=self.model.model_id))
                continue
            spans = get_speech_timestamps(media.data, self.vad, sampling_rate=rate, threshold=p.threshold,
                                          min_speech_duration_ms=p.min_speech_duration_ms,
                                          min_silence_duration_ms=p.min_silence_duration_ms,
                                          speech_pad_ms=p.speech_pad_ms, return_seconds=True)
            out.append({"segments": [{"start_s": s["start"], "end_s": s["end"]} for s in spans]})
        return out
