"""What every media pipeline shares: reading the input's bytes, the byte limit, the result shape.

Media arrive as ``{"data": "<base64>", "format": "wav"}`` in a JSON body, or as a file of a
``multipart/form-data`` upload, which the ingress turns into the same dict holding raw bytes.
URLs are never fetched. Decoding itself belongs to each modality's node (``nodes.audio``,
``nodes.vision``, ``nodes.video``) and runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InvalidField, PayloadTooLarge, UnsupportedMedia
from core.protocol import EngineResult, RequestContext
from nodes.base import Node


class MediaKwargs(BaseModel):
    """Limits and formats every media preprocess node takes from its pipeline config."""

    model_config = ConfigDict(extra="forbid")

    formats: list[str] = Field(..., min_length=1, description="Accepted formats (415 for others).")
    max_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Larger media get 413.")


def media_bytes(payload: Any, kwargs: MediaKwargs, kind: str, model_id: str) -> tuple[bytes, str | None]:
    """The raw bytes and declared format of a media input; 4xx naming the problem otherwise."""
    if not isinstance(payload, dict) or "data" not in payload:
        raise InvalidField(f'input: a {kind} model takes {{"data": "<base64>", "format": "..."}} '
                           f"or a multipart file upload", model_id=model_id, field="input")
    unknown = set(payload) - {"data", "format"}
    if unknown:
        raise InvalidField(f"input.{sorted(unknown)[0]}: unknown field", model_id=model_id,
                           field=f"input.{sorted(unknown)[0]}")
    fmt = payload.get("format")
    if fmt is not None:
        if not isinstance(fmt, str):
            raise InvalidField("input.format: must be a string", model_id=model_id, field="input.format")
        fmt = fmt.lower().lstrip(".")
        if fmt == "jpg":
            fmt = "jpeg"
        if fmt not in kwargs.formats:
            raise UnsupportedMedia(f"input.format: {kind} format {fmt!r} is not supported; "
                                   f"accepted: {', '.join(kwargs.formats)}", model_id=model_id,
                                   field="input.format")
    data = payload["data"]
    if isinstance(data, str):
        if len(data) > 4 * (kwargs.max_bytes // 3 + 1):
            raise _too_large(len(data) * 3 // 4, kwargs, kind, model_id)
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidField("input.data: not valid base64", model_id=model_id, field="input.data") from None
    elif not isinstance(data, (bytes, bytearray)):
        raise InvalidField("input.data: must be a base64 string", model_id=model_id, field="input.data")
    if not data:
        raise InvalidField(f"input.data: the {kind} is empty (0 bytes)", model_id=model_id, field="input.data")
    if len(data) > kwargs.max_bytes:
        raise _too_large(len(data), kwargs, kind, model_id)
    return bytes(data), fmt


def _too_large(size: int, kwargs: MediaKwargs, kind: str, model_id: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"input.data: the {kind} is {size} bytes; this model's limit is "
                           f"{kwargs.max_bytes} bytes (max_bytes)", model_id=model_id, field="input.data")


# Codecs (FFmpeg names, by prefix) that each accepted format stands for: what the decoder found
# in the file is checked against the model's formats, whatever the request declared.
CODECS: dict[str, tuple[str, ...]] = {
    "wav": ("pcm_",), "flac": ("flac",), "mp3": ("mp3",), "ogg": ("vorbis", "opus", "flac"),
    "mp4": ("h264", "hevc", "mpeg4", "av1"), "webm": ("vp8", "vp9", "av1"),
}


def check_codec(codec: str | None, kwargs: MediaKwargs, kind: str, model_id: str) -> None:
    """415 unless the decoded stream's codec belongs to one of the model's formats."""
    codec = (codec or "").lower()
    if not any(codec.startswith(p) for fmt in kwargs.formats for p in CODECS.get(fmt, ())):
        raise UnsupportedMedia(f"input.data: {kind} encoded as {codec or 'an unknown codec'} is not supported; "
                               f"accepted: {', '.join(kwargs.formats)}", model_id=model_id, field="input.data")


def decode_failed(err: Exception, kind: str, kwargs: MediaKwargs, model_id: str) -> InvalidField:
    """A decoder's refusal (corrupt, truncated, another kind of media) as a 422 with the
    decoder's own reason, stripped of source locations and bug-report boilerplate."""
    text = str(err)
    if "stream is unknown" in text:  # FFmpeg found no stream of this kind: e.g. an image sent for audio
        reason = f"the file has no {kind} stream"
    else:
        lines = [ln.strip() for ln in text.splitlines()
                 if ln.strip() and "http" not in ln and "should never happen" not in ln]
        reason = lines[0] if lines else type(err).__name__
        reason = re.sub(r"^.*?\.cpp:\d+, ", "", reason)  # torchcodec's "Failed to ... <file>.cpp:79, "
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", reason)
    return InvalidField(f"input.data: could not decode the input as {kind} ({', '.join(kwargs.formats)}): "
                        f"{reason[:200]}", model_id=model_id, field="input.data")


class MediaResult(Node):
    """Postprocess of media pipelines: ``{"model_id", "output", ...}`` plus the facts about the
    input that the preprocess recorded (``duration_s`` for audio and video)."""

    REPORTED = ("duration_s",)

    async def __call__(self, payload: EngineResult, ctx: RequestContext) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": ctx.model_id, "output": payload.output}
        for key in self.REPORTED:
            if payload.info and key in payload.info:
                body[key] = payload.info[key]
        return body
