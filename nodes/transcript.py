"""Postprocess of speech-to-text pipelines: the transcript in the request's ``response_format``.

``json`` and ``verbose_json`` are the transcript's body; ``text`` is the text alone; ``srt`` and
``vtt`` are subtitles, one cue per segment of the ``verbose_json`` body. The body is the
engine's as it is where the engine makes one (a speech-to-text serving layer's: ``segments: engine``), or is
made here for a recognizer that gives the text alone (a CTC model: ``segments: clip``).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.protocol import EngineResult, RequestContext
from nodes.base import Node

SUBTITLES = ("srt", "vtt")


def _clock(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def subtitles(segments: Iterable[dict[str, Any]], kind: str) -> str:
    """SubRip (``srt``) or WebVTT (``vtt``) cues for ``segments`` (``start``, ``end`` in seconds,
    ``text``), numbered from 1 in SubRip."""
    cues = []
    for i, seg in enumerate(segments, 1):
        decimal = "," if kind == "srt" else "."
        timing = f"{_clock(seg['start'], decimal)} --> {_clock(seg['end'], decimal)}"
        text = str(seg.get("text", "")).strip()
        cues.append(f"{i}\n{timing}\n{text}\n" if kind == "srt" else f"{timing}\n{text}\n")
    body = "\n".join(cues)
    return body if kind == "srt" else "WEBVTT\n\n" + body


def render(body: dict[str, Any], response_format: str) -> Any:
    """The transcript ``body`` (``text``, and ``segments`` where the format needs them) in
    ``response_format``: a dict for the JSON formats, a string for the others."""
    if response_format == "text":
        return body["text"]
    if response_format in SUBTITLES:
        return subtitles(body.get("segments") or (), response_format)
    return body


def clip_transcript(text: str, duration_s: float | None, response_format: str,
                    language: str | None = None) -> dict[str, Any]:
    """The transcript body of a recognizer that gives the text alone, with no timestamps and no
    language of its own (a CTC model): ``{"text"}`` for ``json``; else OpenAI's ``verbose_json``
    body with one segment over the whole clip. Its ``language`` is the one the client stated,
    and is left out where none was: the model detects none, so it claims none."""
    if response_format == "json":
        return {"text": text}
    body: dict[str, Any] = {"task": "transcribe"}
    if language is not None:
        body["language"] = language
    body.update(duration=duration_s, text=text,
                segments=[{"id": 0, "start": 0.0, "end": duration_s or 0.0, "text": text}])
    return body


class TranscriptKwargs(BaseModel):
    """``kwargs`` of the ``transcript`` postprocess."""

    model_config = ConfigDict(extra="forbid")

    segments: Literal["engine", "clip"] = Field("engine", description=(
        "engine: the engine answers the transcript's body itself, with the segments the format "
        "needs (a speech-to-text serving layer); clip: the engine gives {text} alone (a CTC recognizer), and the "
        "transcript is one segment over the whole clip, with no language but the client's."))


class Transcript(Node):
    """``{"model_id", "output", "duration_s"}``: ``output`` is the transcript in the format the
    request's ``response_format`` param names (a string for text, srt and vtt)."""

    Kwargs = TranscriptKwargs
    kwargs: TranscriptKwargs  # Node.__init__ validates them with Kwargs

    async def __call__(self, payload: EngineResult, ctx: RequestContext) -> dict[str, Any]:
        fmt = getattr(ctx.params, "response_format", "json")
        duration = payload.info.get("duration_s") if payload.info else None
        body = payload.output
        if self.kwargs.segments == "clip":
            body = clip_transcript(body["text"], duration, fmt, getattr(ctx.params, "language", None))
        out: dict[str, Any] = {"model_id": ctx.model_id, "output": render(body, fmt)}
        if payload.info and "duration_s" in payload.info:
            out["duration_s"] = duration
        return out
