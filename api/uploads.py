"""Reading ``POST /v1/infer`` bodies: a JSON object, or a ``multipart/form-data`` upload.

Both become the same :class:`~core.protocol.InferRequest`; an uploaded file becomes the media
input ``{"data": <bytes>, "format": ...}`` that a base64 JSON body would have given, so every
node downstream sees one shape. The body size limit is the envelope's (``api.middleware``).
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import BadRequest, InvalidField, from_validation_errors
from core.protocol import InferRequest

UPLOAD_FIELDS = ("model_id", "file", "format", "params", "stream")
# File name suffixes taken as the declared format of an upload (others leave it to the decoder).
MEDIA_SUFFIXES = frozenset({"wav", "flac", "mp3", "ogg", "jpeg", "jpg", "png", "webp", "gif", "bmp",
                            "tiff", "mp4", "webm", "mkv", "avi", "mov", "m4a", "aac", "opus"})


class InferUpload(BaseModel):
    """``POST /v1/infer`` as ``multipart/form-data`` (documents the form in the OpenAPI schema)."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(..., min_length=1, description="A model_id listed by GET /v1/models.")
    file: bytes = Field(..., description="The media file.")
    format: str | None = Field(None, description="wav, png, mp4...; default: the file name's suffix.")
    params: str | None = Field(None, description="Per-request params, as a JSON object.")
    stream: bool = Field(False, description="Answer with Server-Sent Events.")


def infer_request_body() -> dict[str, Any]:
    """The ``requestBody`` of ``/v1/infer`` in the OpenAPI schema: JSON or a form upload."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/InferUpload"}}}}}


async def uploaded_media(upload, fmt: str | None = None) -> dict[str, Any]:
    """The media input ``{"data": <bytes>, "format": ...}`` of an uploaded file; without a
    declared ``fmt``, the file name's suffix when it names a media format."""
    if fmt is None and upload.filename:
        suffix = PurePath(upload.filename).suffix.lstrip(".").lower()
        fmt = suffix if suffix in MEDIA_SUFFIXES else None
    media: dict[str, Any] = {"data": await upload.read()}
    if fmt is not None:
        media["format"] = fmt
    return media


def validated(data: Any) -> InferRequest:
    try:
        return InferRequest.model_validate(data)
    except ValidationError as err:
        raise from_validation_errors([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json_object(request: Request, accepts: str = "application/json") -> dict[str, Any]:
    """The request's JSON object body; 400 naming what is wrong with it otherwise."""
    ctype = content_type(request)
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise BadRequest(f"unsupported Content-Type {ctype!r}: send {accepts}")
    raw = await request.body()
    if not raw:
        raise BadRequest("a JSON body is required")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"malformed JSON: {err}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object (sent with Content-Type: application/json)")
    return data


async def read_infer_request(request: Request) -> InferRequest:
    """The request's body as an InferRequest; 400/422 naming what is wrong otherwise."""
    if content_type(request) == "multipart/form-data":
        return await _from_form(request)
    return validated(await read_json_object(request, "application/json or multipart/form-data"))


async def _from_form(request: Request) -> InferRequest:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=1, max_fields=len(UPLOAD_FIELDS))
    except MultiPartException as err:
        raise BadRequest(f"malformed multipart/form-data body: {err.message}") from None
    for key in form:
        if key not in UPLOAD_FIELDS:
            raise InvalidField(f"{key}: unknown form field; expected {', '.join(UPLOAD_FIELDS)}", field=key)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidField("file: a file upload is required", field="file")
    fmt = form.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise InvalidField("format: must be a text field, not a file", field="format")
    media = await uploaded_media(upload, fmt)
    raw_params = form.get("params") or "{}"
    try:
        params = json.loads(raw_params) if isinstance(raw_params, str) else None
    except ValueError:
        params = None
    if not isinstance(params, dict):
        raise InvalidField("params: must be a JSON object", field="params")
    stream = str(form.get("stream", "false")).lower()
    if stream not in ("true", "false", "1", "0"):
        raise InvalidField("stream: must be true or false", field="stream")
    return validated({"model_id": form.get("model_id"), "input": media, "params": params,
                      "stream": stream in ("true", "1")})
