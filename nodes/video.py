"""Video preprocessing: MP4/WebM bytes → torchcodec's decoder → frames sampled at ``params.fps``
or ``params.num_frames`` → the vision transforms, as one ``[N, 3, crop, crop]`` batch."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from core.errors import InvalidField
from core.protocol import MediaPayload, RequestContext
from engines.classifier import VideoParams
from nodes.media import check_codec, decode_failed, media_bytes
from nodes.vision import ImageKwargs, PixelNode, check_size


class VideoKwargs(ImageKwargs):
    formats: list[str] = Field(["mp4", "webm"], min_length=1)
    max_seconds: float = Field(120.0, gt=0, description="Longer videos get 422.")
    max_frames: int = Field(64, ge=1, description="More sampled frames than this get 422.")
    num_frames: int = Field(8, ge=1, description="Frames sampled when the request names neither "
                                                 "params.fps nor params.num_frames.")


def sample_times(begin: float, duration: float, fps: float | None, num_frames: int) -> list[float]:
    """Timestamps to sample: every ``1/fps`` seconds from the start, or ``num_frames`` at the
    centres of equal spans of the clip."""
    if fps:
        n = max(1, int(duration * fps + 1e-9))
        return [begin + i / fps for i in range(n)]
    return [begin + (i + 0.5) * duration / num_frames for i in range(num_frames)]


class VideoFrames(PixelNode):
    """Samples and transforms a clip's frames; records their timestamps and the duration."""

    requires = ("torch", "torchvision", "torchcodec.decoders")  # torchcodec loads FFmpeg's libraries

    Kwargs = VideoKwargs
    kwargs: VideoKwargs  # Node.__init__ validates them with Kwargs

    async def __call__(self, payload: Any, ctx: RequestContext) -> MediaPayload:
        data, _ = media_bytes(payload, self.kwargs, "video", ctx.model_id)
        # the video engine's params say how to sample; another engine's leave it to the kwargs
        params = ctx.params if isinstance(ctx.params, VideoParams) else VideoParams()
        num_frames = params.num_frames or self.kwargs.num_frames
        return await asyncio.to_thread(self.decode, data, params.fps, num_frames, ctx.model_id)

    def decode(self, data: bytes, fps: float | None, num_frames: int, model_id: str) -> MediaPayload:
        from torchcodec.decoders import VideoDecoder

        kw = self.kwargs
        try:
            decoder = VideoDecoder(data)
            meta = decoder.metadata
        except (RuntimeError, ValueError) as err:
            raise decode_failed(err, "video", kw, model_id) from None
        check_codec(meta.codec, kw, "video", model_id)
        begin = meta.begin_stream_seconds or 0.0
        duration = (meta.end_stream_seconds or 0.0) - begin
        if not meta.num_frames or duration <= 0:
            raise InvalidField("input.data: the video has no frames", model_id=model_id, field="input.data")
        if duration > kw.max_seconds:
            raise InvalidField(f"input.data: the video is {duration:.1f} s; this model's limit is "
                               f"{kw.max_seconds:g} s (max_seconds)", model_id=model_id, field="input.data")
        check_size(meta.width, meta.height, kw, "video frame", model_id)
        times = sample_times(begin, duration, fps, num_frames)
        if len(times) > kw.max_frames:
            raise InvalidField(f"params: sampling gives {len(times)} frames; this model's limit is "
                               f"{kw.max_frames} (max_frames); lower params.fps or params.num_frames",
                               model_id=model_id, field="params")
        last = meta.end_stream_seconds - 1e-3
        try:
            batch = decoder.get_frames_played_at(seconds=[min(t, last) for t in times])
        except (RuntimeError, ValueError, IndexError) as err:
            raise decode_failed(err, "video", kw, model_id) from None
        assert self.transform is not None, "start() builds the transforms before any request"
        return MediaPayload(data=self.transform(batch.data),
                            info={"duration_s": round(duration, 3),
                                  "timestamps_s": [round(float(t), 3) for t in batch.pts_seconds]},
                            finish=self.finish)
