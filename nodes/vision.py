"""Image preprocessing: bytes → ``torchvision.io.decode_image`` → transforms v2 from config.

The image's size is read from its header before anything is decoded, so a small file that
would expand to a huge bitmap is refused (422) at the cost of reading a header.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InvalidField, UnsupportedMedia
from core.protocol import MediaPayload, RequestContext
from nodes.base import Node
from nodes.media import MediaKwargs, decode_failed, media_bytes


class Transforms(BaseModel):
    """The torchvision transforms v2 chain: resize, center crop, scale to [0, 1], normalize."""

    model_config = ConfigDict(extra="forbid")

    resize: int = Field(default=256, ge=1, description="Shorter side after resizing.")
    crop: int = Field(default=224, ge=1, description="Side of the center crop.")
    mean: list[float] = Field(default=[0.485, 0.456, 0.406], min_length=3, max_length=3)
    std: list[float] = Field(default=[0.229, 0.224, 0.225], min_length=3, max_length=3)

    def build(self):
        """``(geometry, finish)``: resize + crop on uint8 here; scale + normalize where the
        model runs (:attr:`core.protocol.MediaPayload.finish`)."""
        from torchvision.transforms import v2

        return (v2.Compose([v2.Resize(self.resize, antialias=True), v2.CenterCrop(self.crop)]),
                ScaleNormalize(tuple(self.mean), tuple(self.std)))


@dataclass(frozen=True)
class ScaleNormalize:
    """uint8 pixels to a model's float input, as torchvision's ``ToDtype(float32, scale=True)``
    then ``Normalize(mean, std)``; plain numbers, so that it crosses a handle hop with each
    payload in a few bytes (the two transforms are modules, which pickle far larger)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels):
        import torch
        from torchvision.transforms.v2 import functional as F

        return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), list(self.mean), list(self.std))


class ImageKwargs(MediaKwargs):
    formats: list[str] = Field(["jpeg", "png", "webp"], min_length=1)
    max_pixels: int = Field(4096 * 4096, ge=1, description="Larger images (width x height) get 422.")
    min_side: int = Field(8, ge=1, description="Images narrower or shorter than this get 422.")
    transforms: Transforms = Field(default_factory=Transforms)


def check_size(width: int, height: int, kw: ImageKwargs, what: str, model_id: str) -> None:
    """422 for an image (or video frame) outside ``min_side`` / ``max_pixels``."""
    if width * height > kw.max_pixels:
        raise InvalidField(f"input.data: the {what} is {width}x{height} = {width * height} pixels; this "
                           f"model's limit is {kw.max_pixels} (max_pixels)", model_id=model_id, field="input.data")
    if min(width, height) < kw.min_side:
        raise InvalidField(f"input.data: the {what} is {width}x{height}; both sides must be at least "
                           f"{kw.min_side} pixels (min_side)", model_id=model_id, field="input.data")


class PixelNode(Node):
    """Base of image and video preprocessing: builds ``kwargs.transforms`` at start-up."""

    requires = ("torch", "torchvision", "PIL")
    kwargs: ImageKwargs  # Node.__init__ validates them with Kwargs, an ImageKwargs in every subclass

    def __init__(self, kwargs, model) -> None:
        super().__init__(kwargs, model)
        self.transform: Callable[[Any], Any] | None = None
        self.finish: ScaleNormalize | None = None

    async def start(self) -> None:
        self.transform, self.finish = self.kwargs.transforms.build()


class ImageDecode(PixelNode):
    """Decodes JPEG, PNG or WebP into the ``[3, crop, crop]`` image a classifier takes."""

    Kwargs = ImageKwargs

    async def __call__(self, payload: Any, ctx: RequestContext) -> MediaPayload:
        data, _ = media_bytes(payload, self.kwargs, "image", ctx.model_id)
        return await asyncio.to_thread(self.decode, data, ctx.model_id)

    def _header(self, data: bytes, model_id: str) -> tuple[int, int]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = (im.format or "").lower(), im.size
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise decode_failed(err, "an image", self.kwargs, model_id) from None
        fmt = "jpeg" if fmt == "mpo" else fmt  # camera JPEGs report MPO
        if fmt not in self.kwargs.formats:
            raise UnsupportedMedia(f"input.data: {fmt or 'this'} images are not supported; accepted: "
                                   f"{', '.join(self.kwargs.formats)}", model_id=model_id, field="input.data")
        return width, height

    def pixels(self, data: bytes, model_id: str):
        """``(image, width, height)``: a ``[3, H, W]`` uint8 tensor and the header's size, within
        the formats and size limits."""
        import torch
        from torchvision.io import ImageReadMode, decode_image

        width, height = self._header(data, model_id)
        check_size(width, height, self.kwargs, "image", model_id)
        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as err:
            raise decode_failed(err, "an image", self.kwargs, model_id) from None
        return image, width, height

    def decode(self, data: bytes, model_id: str) -> MediaPayload:
        image, width, height = self.pixels(data, model_id)
        assert self.transform is not None, "start() builds the transforms before any request"
        return MediaPayload(data=self.transform(image), info={"width": width, "height": height},
                            finish=self.finish)
