"""Image and video classification with a ``torchvision.models`` architecture.

``source`` is a checkpoint directory (``config.json`` with ``arch`` and ``labels``, + ``model.pt``),
``generated:tiny-resnet18`` (the offline default: resnet18 with random weights and 10 labels),
or ``torchvision:<Weights enum>`` such as ``torchvision:ResNet18_Weights.IMAGENET1K_V1`` (the
weights are downloaded, so only where a hub is reachable). Top-k is taken here, in the engine,
so a response carries k scores per frame rather than every class's.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.protocol import MediaPayload
from engines.batching import BatchedEngine


def load_classifier(source: str):
    """``(model, labels)`` for a ``source`` as described in the module docstring."""
    from torchvision.models import get_model

    if source.startswith("torchvision:"):
        from torchvision.models import get_weight

        weights = get_weight(source.split(":", 1)[1])
        arch = type(weights).__name__.removesuffix("_Weights").lower()
        return get_model(arch, weights=weights), list(weights.meta["categories"])
    from engines.checkpoints import read_torch_checkpoint, resolve_source

    config, state = read_torch_checkpoint(resolve_source(source))
    labels = list(config["labels"])
    model = get_model(config["arch"], weights=None, num_classes=len(labels))
    model.load_state_dict(state)
    return model, labels


class ImageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=5, ge=1, le=1000, description="Labels returned, best first.")


class VideoParams(ImageParams):
    fps: float | None = Field(default=None, gt=0, le=60, description="Sample this many frames per second.")
    num_frames: int | None = Field(default=None, ge=1, le=1024, description="Sample this many frames, evenly.")

    @model_validator(mode="after")
    def _one_rate(self) -> "VideoParams":
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("give fps or num_frames, not both")
        return self


class ImageClassifier(BatchedEngine[ImageParams]):
    """Top-k ``[{"label", "score"}]`` per image. A batch is one forward pass over every item."""

    requires = ("torch", "torchvision")

    Params = ImageParams

    def load(self) -> None:
        import torch

        if not self.model.source:
            raise ValueError(f"model {self.model.model_id!r}: a classifier needs a source")
        net, self.labels = load_classifier(self.model.source)
        # Convolutions in channels_last run oneDNN's faster kernels on a CPU, whatever layout the
        # input comes in (resnet18, one thread, 32 frames: 1.0 s against 1.6 s); a payload that
        # crossed Ray's serializer arrives in the slower, contiguous one. BENCHMARKS.md, media.
        self.net = net.eval().to(memory_format=torch.channels_last)

    def _top(self, probs, k: int) -> list[dict[str, Any]]:
        scores, ids = probs.topk(min(k, probs.shape[-1]))
        return [{"label": self.labels[i], "score": round(float(s), 6)} for s, i in zip(scores, ids.tolist())]

    def forward(self, items: list[tuple[MediaPayload, ImageParams]]) -> list:
        """Class probabilities per item (``[C]`` for an image, ``[N, C]`` for frames)."""
        import torch

        tensors = [m.finish(m.data) if m.finish is not None else m.data for m, _ in items]
        tensors = [t.unsqueeze(0) if t.dim() == 3 else t for t in tensors]
        probs = self.net(torch.cat(tensors)).softmax(dim=-1)
        parts = probs.split([t.shape[0] for t in tensors])
        return [p[0] if m.data.dim() == 3 else p for p, (m, _) in zip(parts, items)]

    def run_batch(self, items: list[tuple[MediaPayload, ImageParams]]) -> list[Any]:
        return [self._top(p, params.top_k) for p, (_, params) in zip(self.forward(items), items)]


class VideoClassifier(ImageClassifier):
    """Per-frame top-k with timestamps, and the clip's top-k from the mean of its frames'
    probabilities. Frames of every request in a batch go through the model together."""

    Params = VideoParams

    def run_batch(self, items: list[tuple[MediaPayload, ImageParams]]) -> list[Any]:
        out = []
        for probs, (media, params) in zip(self.forward(items), items):
            frames = [{"timestamp_s": t, "top_k": self._top(p, params.top_k)}
                      for t, p in zip(media.info["timestamps_s"], probs)]
            out.append({"frames": frames, "clip": self._top(probs.mean(dim=0), params.top_k)})
        return out
