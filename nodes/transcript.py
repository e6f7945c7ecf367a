"""Postprocess of speech-to-text pipelines: the transcript in the request's ``response_format``.

``json`` and ``verbose_json`` are the engine's body as it is (vLLM's); ``text`` is the text
alone; ``srt`` and ``vtt`` are subtitles, one cue per segment of the ``verbose_json`` body.
"""

from __future__ import annotations

from typing import Any, Iterable

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


class Transcript(Node):
    """``{"model_id", "output", "duration_s"}``: ``output`` is the transcript in the format the
    request's ``response_format`` param names (a string for text, srt and vtt)."""

    async def __call__(self, payload: EngineResult, ctx: RequestContext) -> dict[str, Any]:
        fmt = getattr(ctx.params, "response_format", "json")
        out: dict[str, Any] = {"model_id": ctx.model_id, "output": render(payload.output, fmt)}
        if payload.info and "duration_s" in payload.info:
            out["duration_s"] = payload.info["duration_s"]
        return out
