"""Where to cut long audio into the windows a speech model hears (Whisper: 30 s).

Each window ends in the middle of the latest pause between speech spans (Silero VAD's) that
leaves it at least half a window long; where no such pause is, at the quietest 100 ms of its
last second, as vLLM's own splitter cuts. Pure functions over sample indices, so the plan is
tested without a model.
"""

from __future__ import annotations

from typing import Sequence


def quietest(audio, start: int, end: int, block: int) -> int:
    """The middle of the ``block``-sample stretch of ``audio[start:end]`` with the least energy."""
    import numpy as np

    n = max(1, (end - start) // block)
    energy = (np.asarray(audio[start:start + n * block], dtype=np.float64).reshape(n, -1) ** 2).mean(axis=1)
    return start + int(energy.argmin()) * block + block // 2


def plan(audio, window: int, speech: Sequence[tuple[int, int]], rate: int) -> list[int]:
    """The cut points (sample indices) of ``audio`` into windows of at most ``window`` samples.

    ``speech``: the speech spans ``(start, end)`` in samples, in order (empty: none found, or
    no VAD). A cut lies in the middle of the latest pause between spans, or before the first or
    after the last, that falls in the window's second half; else at :func:`quietest` of the
    window's last second."""
    total = len(audio)
    pauses = [(0 if i == 0 else speech[i - 1][1], speech[i][0]) for i in range(len(speech))]
    if speech:
        pauses.append((speech[-1][1], total))
    cuts, pos = [], 0
    while total - pos > window:
        end = pos + window
        inside = [(max(a, pos + window // 2), min(b, end)) for a, b in pauses if b > pos + window // 2 and a < end]
        inside = [(a, b) for a, b in inside if b > a]
        cut = (inside[-1][0] + inside[-1][1]) // 2 if inside else quietest(audio, end - rate, end, rate // 10)
        cuts.append(cut)
        pos = cut
    return cuts
