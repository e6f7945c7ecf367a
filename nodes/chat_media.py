"""Preprocess of vision-language chat: the images of chat messages checked before they reach vLLM.

Each ``image_url`` content part is decoded by the image node's own decoder and limits
(:class:`nodes.vision.ImageDecode`: formats, ``max_bytes``, ``max_pixels``, ``min_side``), so a
corrupt, oversized or unsupported image is a 4xx naming its part (``messages.0.content.1``)
before any hop. Images come as ``data:`` URLs (base64). An ``http(s)`` URL is fetched only when
its host is in ``url_domains`` (none by default), here, within ``url_timeout_s`` and
``max_bytes``, and handed on as a ``data:`` URL: vLLM itself never fetches.

The node serves ``/v1/chat/completions`` (:class:`OpenAIBody`) and ``/v1/infer`` (chat
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
from core.protocol import OpenAIBody, RequestContext
from nodes.base import Node
from nodes.media import media_bytes
from nodes.vision import ImageDecode, ImageKwargs

DATA_URL = re.compile(r"data:image/([\w.+-]+);base64,(.*)", re.S)


class ChatMediaKwargs(ImageKwargs):
    max_images: int = Field(4, ge=0, description="Most images in one request (400 above).")
    url_domains: list[str] = Field(default_factory=list, description=(
        "Hosts whose http(s) image URLs are fetched; empty: data: URLs only."))
    url_timeout_s: float = Field(5.0, gt=0, description="Time to fetch one image URL.")


class ChatMedia(Node):
    """Checks (and, from allowed hosts, fetches) every image of a chat request."""

    Kwargs = ChatMediaKwargs
    requires = ImageDecode.requires
    #: what a model behind this node takes, as ``GET /v1/models`` lists it
    INPUTS = ["text", "image"]
    checks_openai = True

    def __init__(self, kwargs, model) -> None:
        super().__init__(kwargs, model)
        image = self.kwargs.model_dump(exclude={"max_images", "url_domains", "url_timeout_s"})
        self.images = ImageDecode(image, model)

    async def start(self) -> None:
        await self.images.start()

    async def __call__(self, payload: Any, ctx: RequestContext) -> Any:
        if isinstance(payload, OpenAIBody):
            if payload.route == "chat":
                await self.check_messages(payload.body.get("messages"), ctx.model_id, "messages")
            return payload
        if isinstance(payload, str):
            return {"messages": [{"role": "user", "content": payload}]}
        if not isinstance(payload, dict) or "messages" not in payload:
            raise InvalidField("input: a vision-language model takes chat messages (or a prompt)",
                               model_id=ctx.model_id, field="input")
        await self.check_messages(payload["messages"], ctx.model_id, "messages")
        return payload

    async def check_messages(self, messages: Any, model_id: str, where: str) -> None:
        """Every image part of ``messages``, checked (and fetched URLs inlined) in place."""
        parts = [(f"{where}.{i}.content.{j}", part)
                 for i, m in enumerate(messages if isinstance(messages, list) else ())
                 if isinstance(m, dict) and isinstance(m.get("content"), list)
                 for j, part in enumerate(m["content"])
                 if isinstance(part, dict) and part.get("type") == "image_url"]
        if len(parts) > self.kwargs.max_images:
            raise InvalidParameter(f"{where}: {len(parts)} images; this model takes at most "
                                   f"{self.kwargs.max_images} per request (max_images)",
                                   model_id=model_id, field=where)
        for field, part in parts:
            await self._check(part, field, model_id)

    async def _check(self, part: dict, field: str, model_id: str) -> None:
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise InvalidParameter(f"{field}.image_url.url: a data: URL (or an allowed http(s) URL) "
                                   f"is required", model_id=model_id, field=f"{field}.image_url.url")
        if not url.startswith("data:"):
            url = await self._fetch(url, field, model_id)
            part["image_url"] = {**(image_url if isinstance(image_url, dict) else {}), "url": url}
        match = DATA_URL.fullmatch(url)
        if match is None:
            raise InvalidParameter(f"{field}: not a base64 image data: URL (data:image/<format>;base64,...)",
                                   model_id=model_id, field=field)
        fmt, data = match.groups()
        try:
            raw, _ = media_bytes({"data": data, "format": fmt}, self.images.kwargs, "image", model_id)
            await asyncio.to_thread(self.images.decode, raw, model_id)
        except MMServeError as err:  # the image node's own words, about this part
            err.message = err.message.replace("input.data", field).replace("input.format", field)
            err.field = field
            raise

    async def _fetch(self, url: str, field: str, model_id: str) -> str:
        """An allowed host's image as a data: URL; 400 for any other URL."""
        import httpx

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.hostname not in self.kwargs.url_domains:
            allowed = ", ".join(self.kwargs.url_domains) or "none: data: URLs only"
            raise InvalidParameter(f"{field}: image URLs of {parts.hostname or parts.scheme or url[:20]!r} are "
                                   f"not fetched for this model (url_domains: {allowed})",
                                   model_id=model_id, field=field)
        limit = self.kwargs.max_bytes
        try:
            async with httpx.AsyncClient(timeout=self.kwargs.url_timeout_s, follow_redirects=False) as client:
                async with client.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise InvalidParameter(f"{field}: fetching the image gave HTTP {r.status_code}",
                                               model_id=model_id, field=field)
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise PayloadTooLarge(f"{field}: the image is over this model's limit of {limit} "
                                                  f"bytes (max_bytes)", model_id=model_id, field=field)
                    kind = r.headers.get("content-type", "image/jpeg").split(";")[0]
        except httpx.HTTPError as err:
            raise InvalidParameter(f"{field}: the image could not be fetched ({type(err).__name__})",
                                   model_id=model_id, field=field) from None
        return f"data:{kind};base64,{base64.b64encode(bytes(data)).decode()}"
