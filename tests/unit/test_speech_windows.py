"""Where long audio is cut into a speech model's windows, and where each window's segments land."""

from __future__ import annotations

import numpy as np
import pytest

from engines.speech_windows import plan

RATE = 16000
WINDOW = 30 * RATE


def s(seconds: float) -> int:
    return int(seconds * RATE)


def noise(seconds: float) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(s(seconds)).astype(np.float32)


def test_cuts_fall_in_the_middle_of_the_latest_pause_of_each_window():
    audio = noise(70)
    speech = [(0, s(20)), (s(24), s(50)), (s(53), s(70))]
    # the second window runs from 22 to 52 s: the pause from 50 s is cut at the window's end
    assert plan(audio, WINDOW, speech, RATE) == [s(22), s(51)]


def test_a_pause_in_a_windows_first_half_is_not_used_and_the_quietest_moment_is():
    audio = noise(45)
    audio[s(29.3):s(29.4)] = 0  # the quietest 100 ms of the window's last second
    speech = [(0, s(10)), (s(12), s(45))]  # the only pause ends at 12 s: too early
    (cut,) = plan(audio, WINDOW, speech, RATE)
    assert s(29.3) <= cut <= s(29.4)


def test_no_speech_found_cuts_where_vllm_would_and_short_audio_is_not_cut():
    audio = noise(95)
    for t in (29.5, 59.2, 88.6):
        audio[s(t):s(t + 0.1)] *= 0.01
    cuts = plan(audio, WINDOW, [], RATE)
    assert [c / RATE for c in cuts] == pytest.approx([29.55, 59.25, 88.65], abs=0.06)
    assert plan(noise(30), WINDOW, [], RATE) == []


def test_every_window_fits():
    audio = noise(200)
    speech = [(s(t), s(t + 7)) for t in range(0, 200, 9)]  # 2 s pauses every 9 s
    cuts = [0, *plan(audio, WINDOW, speech, RATE), len(audio)]
    assert all(0 < b - a <= WINDOW for a, b in zip(cuts, cuts[1:]))
    assert all(any(e < c < n for (_, e), (n, _) in zip(speech, speech[1:])) for c in cuts[1:-1])


def test_segments_move_to_their_windows_offset():
    from engines.whisper import VLLMTranscriber

    segments = [{"seek": 0, "start": 1.0, "end": 2.0}, {"seek": 30, "start": 31.5, "end": 33.0}]
    VLLMTranscriber._place(segments, [0, s(22)], RATE, 30)
    assert segments == [{"seek": 0, "start": 1.0, "end": 2.0}, {"seek": 22, "start": 23.5, "end": 25.0}]
