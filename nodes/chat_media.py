"""Preprocess of vision-language chat: the images and videos of a request checked before they
reach the engine.

Each image URL (chat's ``image_url`` parts, the Responses API's ``input_image``, Anthropic's image
``source``, the messages of ``/tokenize``) is decoded by the image node's own decoder and limits
(:class:`nodes.vision.ImageDecode`: formats, ``max_bytes``, ``max_pixels``, ``min_side``), and
each ``video_url`` by the video node's (:class:`nodes.video.VideoFrames`), so a corrupt,
oversized or unsupported one is a 4xx naming its part (``messages.0.content.1``) before any
hop; so is one more than the model's ``limit_mm_per_prompt``. Media come as ``data:`` URLs
(base64). An ``http(s)`` URL is fetched only when
its host is in ``url_domains`` (none by default), here, within ``url_timeout_s`` and
``max_bytes``, and handed on as a ``data:`` URL: the engine itself never fetches.

The node serves the OpenAI-compatible routes (:class:`OpenAIBody`) and ``/v1/infer`` (chat
``messages``, or a prompt as one user message); the engine renders the chat template.
"""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field

from core.errors import InvalidField, InvalidParameter, MMServeError, PayloadTooLarge
from core.protocol import MediaChatOptions, OpenAIBody, RequestContext
from core.registry import engine_options_of
from nodes.base import Node
from nodes.media import media_bytes
from nodes.video import VideoFrames
from nodes.vision import ImageDecode, ImageKwargs

DATA_URL = re.compile(r"data:(image|video)/([\w.+-]+);base64,(.*)", re.S)
#: the content parts' keys that hold a URL (or an object with a ``url``), and the kind of media
#: behind it: OpenAI's parts, and the ``source`` of Anthropic's image blocks
KINDS = {"image_url": "image", "video_url": "video", "source": "image"}


class ChatMediaKwargs(ImageKwargs):
    video_formats: list[str] = Field(["mp4", "webm"], min_length=1, description="Accepted video formats.")
    max_video_seconds: float = Field(30.0, gt=0, description="Longer videos get 422.")
    url_domains: list[str] = Field(default_factory=list, description=(
        "Hosts whose http(s) media URLs are fetched; empty: data: URLs only."))
    url_timeout_s: float = Field(5.0, gt=0, description="Time to fetch one media URL.")


class ChatMedia(Node):
    """Checks (and, from allowed hosts, fetches) every image and video of a request."""

    Kwargs = ChatMediaKwargs
    kwargs: ChatMediaKwargs  # Node.__init__ validates them with Kwargs
    requires = (*ImageDecode.requires, *VideoFrames.requires)
    checks_openai = True
    engine_options = MediaChatOptions

    @classmethod
    def inputs_of(cls, model) -> list[str]:
        """What a model behind this node takes, as ``GET /v1/models`` lists it."""
        limits = limits_of(model)
        return ["text", *(kind for kind in ("image", "video") if limits.get(kind) != 0)]

    def __init__(self, kwargs, model) -> None:
        super().__init__(kwargs, model)
        self.limits = limits_of(model)
        kw = self.kwargs
        image = kw.model_dump(include=set(ImageKwargs.model_fields))
        self.images = ImageDecode(image, model)
        self.videos = VideoFrames({**image, "formats": kw.video_formats, "max_seconds": kw.max_video_seconds,
                                   "num_frames": 2}, model)  # two frames decoded: the file is sound

    async def start(self) -> None:
        await self.images.start()
        await self.videos.start()

    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        if isinstance(payload, OpenAIBody):
            await self.check(payload.body, ctx.model_id)
            return payload
        if isinstance(payload, str):
            return {"messages": [{"role": "user", "content": payload}]}
        if not isinstance(payload, dict) or "messages" not in payload:
            raise InvalidField("input: a vision-language model takes chat messages (or a prompt)",
                               model_id=ctx.model_id, field="input")
        await self.check({"messages": payload["messages"]}, ctx.model_id)
        return payload

    async def check(self, body: dict, model_id: str) -> None:
        """Every media URL of ``body``, whichever route's shape it has (chat's ``image_url`` and
        ``video_url`` parts, the Responses API's ``input_image``, ``/tokenize``'s messages):
        checked, and fetched ones inlined, in place. A refusal names the part holding the URL."""
        found = list(_media_urls(body, "", ""))
        for kind, most in self.limits.items():
            count = sum(1 for k, *_ in found if k == kind)
            if count > most:
                where = next(part for k, part, *_ in found if k == kind).split(".")[0]
                raise InvalidParameter(f"{where}: {count} {kind}s; this model takes at most {most} per "
                                       f"request (engine_kwargs.limit_mm_per_prompt)", model_id=model_id,
                                       field=where)
        for kind, part, holder, key in found:
            holder[key] = await self._checked(kind, holder[key], part, model_id)

    async def _checked(self, kind: str, url: str, field: str, model_id: str) -> str:
        """``url`` as the data: URL to hand the engine, once its media passed the image (or video) node."""
        if not url.startswith("data:"):
            url = await self._fetch(url, kind, field, model_id)
        match = DATA_URL.fullmatch(url)
        if match is None or match.group(1) != kind:
            raise InvalidParameter(f"{field}: not a base64 {kind} data: URL (data:{kind}/<format>;base64,...)",
                                   model_id=model_id, field=field)
        _, fmt, data = match.groups()
        node = self.images if kind == "image" else self.videos
        try:
            raw, _ = media_bytes({"data": data, "format": fmt}, node.kwargs, kind, model_id)
            if kind == "image":  # decoded within the limits; the engine's processor resizes it itself
                await asyncio.to_thread(self.images.pixels, raw, model_id)
            else:
                await asyncio.to_thread(self.videos.decode, raw, None, 2, model_id)
        except MMServeError as err:  # the image node's own words, about this part
            err.message = err.message.replace("input.data", field).replace("input.format", field)
            err.field = field
            raise
        return url

    async def _fetch(self, url: str, kind: str, field: str, model_id: str) -> str:
        """An allowed host's image or video as a data: URL; 400 for any other URL."""
        import httpx

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.hostname not in self.kwargs.url_domains:
            allowed = ", ".join(self.kwargs.url_domains) or "none: data: URLs only"
            raise InvalidParameter(f"{field}: media URLs of {parts.hostname or parts.scheme or url[:20]!r} are "
                                   f"not fetched for this model (url_domains: {allowed})",
                                   model_id=model_id, field=field)
        limit = self.kwargs.max_bytes
        try:
            async with httpx.AsyncClient(timeout=self.kwargs.url_timeout_s, follow_redirects=False) as client:
                async with client.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise InvalidParameter(f"{field}: fetching the {kind} gave HTTP {r.status_code}",
                                               model_id=model_id, field=field)
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise PayloadTooLarge(f"{field}: the {kind} is over this model's limit of {limit} "
                                                  f"bytes (max_bytes)", model_id=model_id, field=field)
                    mime = r.headers.get("content-type", f"{kind}/octet-stream").split(";")[0]
        except httpx.HTTPError as err:
            raise InvalidParameter(f"{field}: the {kind} could not be fetched ({type(err).__name__})",
                                   model_id=model_id, field=field) from None
        return f"data:{mime};base64,{base64.b64encode(bytes(data)).decode()}"


def limits_of(model) -> dict[str, int]:
    """The most items of each kind a request may hold: the engine's ``limit_mm_per_prompt``
    (the engine refuses more; checked here first, with the part named)."""
    return dict(engine_options_of(model, MediaChatOptions).limit_mm_per_prompt or {})


def _media_urls(obj: Any, path: str, part: str, kind: str | None = None):
    """``(kind, part path, holder, key)`` of every media URL string in ``obj``: the value of an
    ``image_url`` (``video_url``) key, or of ``url`` inside one. ``part`` is the nearest
    enclosing object with a ``type`` (a content part), whose path names a refusal."""
    if isinstance(obj, dict):
        if "type" in obj:
            part = path
        for key, value in obj.items():
            sub = f"{path}.{key}" if path else key
            found = KINDS.get(key) or (kind if key == "url" else None)
            if isinstance(value, str) and found:
                yield found, part or sub, obj, key
            elif isinstance(value, (dict, list)):
                yield from _media_urls(value, sub, part, KINDS.get(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _media_urls(value, f"{path}.{i}", part)
