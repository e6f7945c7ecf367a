"""Speech to text on real vLLM (CPU), over real HTTP: the generated tiny Whisper behind
``/v1/audio/transcriptions`` and ``/v1/audio/translations`` through the ``openai`` client, and on
``/v1/infer``. Its engine is in its own deployment, so the decoded samples cross a handle hop.
Random weights make the text gibberish, but greedy decoding makes it repeatable, so the formats
are checked against one another: the same transcript, the same segments, the same cue times.

One Serve instance and one vLLM start-up for the module (about a minute on 2 cores).
"""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest

from tests import media

pytestmark = pytest.mark.integration

OVERRIDES = ["model=[tiny_whisper]", "pipeline=[speech]"]
MODEL = "tiny-whisper"
CUE = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


@pytest.fixture(scope="module")
def client(serve_app):
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_app}/v1", api_key="-", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app, timeout=120) as c:
        yield c


WAV = media.encode_audio(media.clip_with_speech())  # 4 s


def transcribe(client, response_format: str, audio: bytes = WAV, **kw):
    return client.audio.transcriptions.create(model=MODEL, file=("speech.wav", audio), language="en",
                                              response_format=response_format, temperature=0.0, **kw)


def cue_times(subtitles: str) -> list[tuple[float, float]]:
    def seconds(h, m, s, ms):
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    return [(seconds(*m.groups()[:4]), seconds(*m.groups()[4:])) for m in CUE.finditer(subtitles)]


def test_every_response_format_carries_the_same_transcript(client):
    as_json = transcribe(client, "json")
    as_text = transcribe(client, "text")
    verbose = transcribe(client, "verbose_json")
    srt = transcribe(client, "srt")
    vtt = transcribe(client, "vtt")
    assert isinstance(as_json.text, str) and as_json.text and "<|" not in as_json.text  # no timestamps asked
    assert as_text.strip() == as_json.text.strip()  # greedy: the same prompt gives the same words
    assert verbose.language == "en" and float(verbose.duration) == pytest.approx(4.0, abs=0.01)
    assert verbose.segments, "the tiny Whisper's timestamp tokens make segments"
    times = [(s.start, s.end) for s in verbose.segments]
    # one 30 s window; random weights emit timestamps in any order, so start may exceed end
    assert all(s.seek == 0 and 0.0 <= s.start <= 30.0 and 0.0 <= s.end <= 30.0 for s in verbose.segments)
    # the subtitles are the verbose transcript's segments, one cue each, at the same times
    flat = [t for pair in times for t in pair]
    assert srt.startswith("1\n") and [t for p in cue_times(srt) for t in p] == pytest.approx(flat, abs=0.001)
    assert vtt.startswith("WEBVTT\n\n") and [t for p in cue_times(vtt) for t in p] == pytest.approx(flat, abs=0.001)
    assert "," in srt.splitlines()[1] and "." in vtt.splitlines()[2]  # each format's decimal mark


def test_long_audio_is_split_into_30_second_windows(client):
    clip = media.clip_with_speech(before_s=20.0, speech_s=30.0, after_s=20.0)  # 70 s
    verbose = transcribe(client, "verbose_json", media.encode_audio(clip))
    assert float(verbose.duration) == pytest.approx(70.0, abs=0.01)
    # each window's segments are placed at its own offset (seek): 0, 30 and 60 s (Whisper
    # alone hears the first 30 s only)
    assert {s.seek for s in verbose.segments} == {0, 30, 60}
    assert all(s.seek <= s.start <= s.seek + 30 for s in verbose.segments)
    assert transcribe(client, "json", media.encode_audio(clip)).usage.seconds == 70


def test_the_language_is_detected_when_not_given_and_checked_when_given(client, http):
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    r = client.audio.transcriptions.create(model=MODEL, file=("speech.wav", WAV), response_format="verbose_json")
    assert r.language in LANGUAGES  # the model's own pick among Whisper's language tokens
    r = http.post("/v1/audio/transcriptions", data={"model": MODEL, "language": "xx"},
                  files={"file": ("speech.wav", WAV)})
    assert r.status_code == 400 and r.json()["error"]["field"] == "language", r.text
    assert "xx" in r.json()["error"]["message"]


def test_translation_is_whispers_translate_task(client):
    a = client.audio.translations.create(model=MODEL, file=("speech.wav", WAV), temperature=0.0)
    b = transcribe(client, "json")
    assert isinstance(a.text, str) and a.text
    assert a.text != b.text  # <|translate|> in the decoder prompt, not <|transcribe|>


def test_infer_takes_the_same_params(http):
    body = {"model_id": MODEL, "input": {"data": media.b64(WAV), "format": "wav"},
            "params": {"language": "en", "response_format": "srt"}}
    r = http.post("/v1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_id"] == MODEL and out["duration_s"] == pytest.approx(4.0, abs=0.01)
    assert out["output"].startswith("1\n") and cue_times(out["output"])
    r = http.post("/v1/infer", json={**body, "params": {"response_format": "docx"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "params.response_format"


@pytest.mark.parametrize("data, files, status, field, says", [
    ({"model": MODEL}, {"file": ("x.wav", b"\x00\x01garbage" * 64)}, 422, "input.data", "could not decode"),
    ({"model": MODEL, "colour": "red"}, {"file": ("s.wav", WAV)}, 422, "colour", "unknown parameter"),
    ({"model": MODEL, "temperature": "hot"}, {"file": ("s.wav", WAV)}, 422, "temperature", "number"),
    ({"model": MODEL, "response_format": "docx"}, {"file": ("s.wav", WAV)}, 422, "response_format", "srt"),
    ({"model": MODEL, "timestamp_granularities[]": "word"}, {"file": ("s.wav", WAV)}, 422,
     "timestamp_granularities.0", "segment"),
])
def test_bad_requests_name_the_field_and_the_model_serves_on(http, data, files, status, field, says):
    r = http.post("/v1/audio/transcriptions", data=data, files=files)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and says in err["message"], err
    assert http.post("/v1/audio/transcriptions", data={"model": MODEL, "language": "en"},
                     files={"file": ("s.wav", WAV)}).status_code == 200


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client):
    clips = [WAV, media.encode_audio(media.clip_with_speech(before_s=2.0))]
    expected = [transcribe(client, "json", clip).text for clip in clips]
    assert expected[0] != expected[1]  # what is decoded depends on the audio
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda i: transcribe(client, "json", clips[i % 2]).text, range(8)))
    assert texts == [expected[i % 2] for i in range(8)]


def test_models_list_what_it_takes(http):
    card = http.get(f"/v1/models/{MODEL}").json()
    assert card["inputs"] == ["audio"] and card["openai_routes"] == ["transcription", "translation"]
    assert card["status"] == "ready" and card["max_model_len"] == 448  # vLLM's own facts
