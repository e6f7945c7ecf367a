"""Media that tests synthesize and encode for real: speech-like audio, tones, images, videos."""

from __future__ import annotations

import base64
import io
import math

import torch

SR = 16000


def speechlike(seconds: float = 1.5, sr: int = SR, seed: int = 0) -> torch.Tensor:
    """A voiced, speech-like signal: a glottal-like harmonic source with intonation, through
    formant filters of five vowels, in syllables at 4 Hz. Silero VAD takes it for speech."""
    import torchaudio.functional as F

    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sr)
    t = torch.arange(n) / sr
    f0 = 120 + 30 * torch.sin(2 * math.pi * 1.5 * t) + 10 * torch.sin(2 * math.pi * 5 * t)
    phase = torch.cumsum(2 * math.pi * f0 / sr, 0)
    source = sum(torch.sin(k * phase) / k for k in range(1, 40)) + 0.05 * torch.randn(n, generator=g)
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (660, 1720, 2410)]
    seg = n // len(vowels)
    out = torch.zeros(n)
    for i, formants in enumerate(vowels):
        x = source[i * seg:(i + 1) * seg]
        out[i * seg:(i + 1) * seg] = sum(F.bandpass_biquad(x, sr, f, Q=5.0) * a
                                         for f, a in zip(formants, (1.0, 0.6, 0.3)))
    out = out * (0.5 * (1 - torch.cos(2 * math.pi * 4 * t))).clamp(min=0) ** 0.5
    return 0.5 * out / out.abs().max()


def clip_with_speech(before_s: float = 1.0, speech_s: float = 1.5, after_s: float = 1.5,
                     sr: int = SR, channels: int = 1) -> torch.Tensor:
    """Quiet noise, then speech from ``before_s`` for ``speech_s`` seconds, then quiet: [C, T]."""
    g = torch.Generator().manual_seed(1)
    clip = 0.001 * torch.randn(int((before_s + speech_s + after_s) * sr), generator=g)
    start = int(before_s * sr)
    clip[start:start + int(speech_s * sr)] += speechlike(speech_s, sr)
    return clip.unsqueeze(0).repeat(channels, 1)


def tone(seconds: float = 1.0, hz: float = 440.0, sr: int = SR, channels: int = 1) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return (0.3 * torch.sin(2 * math.pi * hz * t)).unsqueeze(0).repeat(channels, 1)


def encode_audio(wave: torch.Tensor, fmt: str = "wav", sr: int = SR) -> bytes:
    from torchcodec.encoders import AudioEncoder

    return AudioEncoder(wave, sample_rate=sr).to_tensor(format=fmt).numpy().tobytes()


def image(width: int = 64, height: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


def encode_image(img: torch.Tensor, fmt: str = "png") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format=fmt.upper())
    return buf.getvalue()


def encode_video(frames: int = 20, fps: int = 10, size: int = 64, fmt: str = "mp4") -> bytes:
    """A clip of moving random blocks, ``frames / fps`` seconds long."""
    from torchcodec.encoders import VideoEncoder

    g = torch.Generator().manual_seed(2)
    base = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    clip = torch.stack([base.roll(i * 2, dims=2) for i in range(frames)])
    return VideoEncoder(clip, frame_rate=fps).to_tensor(format=fmt).numpy().tobytes()


def data_url(data: bytes, fmt: str = "png", kind: str = "image") -> str:
    """``data`` as a base64 ``data:`` URL of MIME type ``<kind>/<fmt>``."""
    return f"data:{kind}/{fmt};base64," + base64.b64encode(data).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
