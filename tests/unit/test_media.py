"""Audio, vision and video pipelines in process (no Ray): real decoding of synthesized media,
real Silero VAD weights, the generated ASR and resnet18 checkpoints, both input encodings,
the OpenAI transcription route, every kind of bad input, and batching."""

from __future__ import annotations

import asyncio

import pytest
from starlette.testclient import TestClient

from apps.config import compose
from api.app import create_app
from tests import media
from tests.support import inline_router

OVERRIDES = [
    "model=[silero_vad,tiny_asr,tiny_resnet,tiny_video]",
    "pipeline=[vad,asr,vision,video]",
    "pipeline.asr.preprocess.kwargs.max_seconds=5",
    "pipeline.vision.preprocess.kwargs.max_pixels=40000",
    "pipeline.vision.preprocess.kwargs.max_bytes=100000",
    "pipeline.video.preprocess.kwargs.max_frames=16",
]


@pytest.fixture(scope="module")
def client():
    cfg = compose(OVERRIDES)
    router = inline_router(cfg)
    asyncio.run(router.start())
    with TestClient(create_app(router, cfg.server), raise_server_exceptions=False) as c:
        c.router = router
        yield c


def infer(client, model_id, data: bytes, fmt: str | None = None, **params):
    body = {"model_id": model_id, "input": {"data": media.b64(data), **({"format": fmt} if fmt else {})}}
    if params:
        body["params"] = params
    return client.post("/v1/infer", json=body)


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# --- audio ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg"])
def test_vad_finds_the_speech_segment_in_every_format(client, fmt):
    clip = media.encode_audio(media.clip_with_speech(before_s=1.0, speech_s=1.5), fmt)
    body = ok(infer(client, "silero-vad", clip, fmt))
    assert body["duration_s"] == pytest.approx(4.0, abs=0.1)
    (seg,) = body["output"]["segments"]
    assert 0.8 <= seg["start_s"] <= 1.2 and 2.3 <= seg["end_s"] <= 2.8, seg


def test_vad_downmixes_and_resamples_stereo_44k(client):
    clip = media.clip_with_speech(sr=44100, channels=2)
    body = ok(infer(client, "silero-vad", media.encode_audio(clip, "flac", sr=44100)))
    assert len(body["output"]["segments"]) == 1 and body["duration_s"] == pytest.approx(4.0, abs=0.1)


def test_vad_on_silence_and_on_a_tone_finds_no_speech(client):
    assert ok(infer(client, "silero-vad", media.encode_audio(media.tone(2.0) * 0)))["output"]["segments"] == []
    assert ok(infer(client, "silero-vad", media.encode_audio(media.tone(2.0))))["output"]["segments"] == []


def test_vad_params_reach_the_engine(client):
    clip = media.encode_audio(media.clip_with_speech(speech_s=1.5))
    assert ok(infer(client, "silero-vad", clip, min_speech_duration_ms=3000))["output"]["segments"] == []
    assert error_of(infer(client, "silero-vad", clip, threshold=2), 422)["field"] == "params.threshold"


def test_asr_transcribes_to_characters_of_its_vocabulary(client):
    body = ok(infer(client, "tiny-asr", media.encode_audio(media.clip_with_speech()), "wav"))
    text = body["output"]["text"]
    assert isinstance(text, str) and set(text) <= set(" ETAONIHSRDLUMWCFGYPBVK'XJQZ")
    assert body["duration_s"] == pytest.approx(4.0, abs=0.1)
    assert set(body) == {"model_id", "output", "duration_s"} and set(body["output"]) == {"text"}


def test_asr_pipeline_renders_its_transcript_in_the_requested_format(client):
    """The CTC model's pipeline renders the transcript (its transcript postprocess), so
    /v1/infer gives every format the transcription route gives, from the same params."""
    wav = media.encode_audio(media.clip_with_speech())
    text = ok(infer(client, "tiny-asr", wav))["output"]["text"]
    body = ok(infer(client, "tiny-asr", wav, response_format="srt"))
    assert body["output"] == f"1\n00:00:00,000 --> 00:00:04,000\n{text}\n"
    verbose = ok(infer(client, "tiny-asr", wav, response_format="verbose_json", language="en"))["output"]
    assert verbose["language"] == "en" and verbose["text"] == text
    assert error_of(infer(client, "tiny-asr", wav, temperature=0), 422)["field"] == "params.temperature"


def test_asr_refuses_silence_and_audio_over_its_limit(client):
    err = error_of(infer(client, "tiny-asr", media.encode_audio(media.tone(1.0) * 0)), 422)
    assert "silent" in err["message"]
    err = error_of(infer(client, "tiny-asr", media.encode_audio(media.tone(6.0))), 422)
    assert "5 s (max_seconds)" in err["message"]


# --- vision and video ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_classification_top_k(client, fmt):
    body = ok(infer(client, "tiny-resnet", media.encode_image(media.image(), fmt), fmt, top_k=4))
    scores = [x["score"] for x in body["output"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert {x["label"] for x in body["output"]} <= {"airplane", "automobile", "bird", "cat", "deer", "dog",
                                                     "frog", "horse", "ship", "truck"}


def test_image_default_top_k_from_the_model_config(client):
    assert len(ok(infer(client, "tiny-resnet", media.encode_image(media.image())))["output"]) == 3


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_video_frames_with_timestamps_and_a_clip_aggregate(client, fmt):
    clip = media.encode_video(frames=20, fps=10, fmt=fmt)  # 2 s
    body = ok(infer(client, "tiny-video", clip, fmt, num_frames=4, top_k=2))
    frames = body["output"]["frames"]
    assert [f["timestamp_s"] for f in frames] == pytest.approx([0.2, 0.7, 1.2, 1.7], abs=0.06)
    assert all(len(f["top_k"]) == 2 for f in frames) and len(body["output"]["clip"]) == 2
    assert body["duration_s"] == pytest.approx(2.0, abs=0.05)
    by_fps = ok(infer(client, "tiny-video", clip, fmt, fps=2))["output"]["frames"]
    assert [f["timestamp_s"] for f in by_fps] == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=0.06)


def test_video_sampling_params_are_checked(client):
    clip = media.encode_video()
    assert "not both" in error_of(infer(client, "tiny-video", clip, fps=1, num_frames=2), 422)["message"]
    err = error_of(infer(client, "tiny-video", clip, fps=10), 422)  # 20 frames > max_frames 16
    assert "20 frames" in err["message"] and "max_frames" in err["message"]


# --- multipart uploads and the OpenAI transcription route ----------------------------------

def test_multipart_upload_on_infer(client):
    png = media.encode_image(media.image(), "png")
    r = client.post("/v1/infer", data={"model_id": "tiny-resnet", "params": '{"top_k": 2}'},
                    files={"file": ("cat.png", png, "image/png")})
    assert len(ok(r)["output"]) == 2
    wav = media.encode_audio(media.clip_with_speech())
    r = client.post("/v1/infer", data={"model_id": "silero-vad"}, files={"file": ("a.wav", wav, "audio/wav")})
    assert len(ok(r)["output"]["segments"]) == 1


def test_multipart_errors_name_the_field(client):
    png = media.encode_image(media.image(), "png")
    assert error_of(client.post("/v1/infer", data={"model_id": "tiny-resnet"}), 400)  # no file: not multipart
    r = client.post("/v1/infer", data={"model_id": "tiny-resnet", "params": "[1]"},
                    files={"file": ("x.png", png)})
    assert error_of(r, 422)["field"] == "params"
    r = client.post("/v1/infer", data={"model_id": "tiny-resnet", "colour": "red"}, files={"file": ("x.png", png)})
    assert error_of(r, 422)["field"] == "colour"
    r = client.post("/v1/infer", data={"model_id": "tiny-resnet"}, files={"file": ("x.gif", png)})
    assert error_of(r, 415)["field"] == "input.format"


def test_openai_transcriptions_in_every_format_carry_one_transcript(client):
    wav = media.encode_audio(media.clip_with_speech())

    def post(response_format: str):
        r = client.post("/v1/audio/transcriptions", files={"file": ("speech.wav", wav, "audio/wav")},
                        data={"model": "tiny-asr", "response_format": response_format, "language": "en"})
        assert r.status_code == 200, r.text
        return r

    text = post("json").json()["text"]
    assert isinstance(text, str) and post("json").json() == {"text": text}
    r = post("text")
    assert r.headers["content-type"].startswith("text/plain") and r.text == text
    verbose = post("verbose_json").json()
    assert verbose["duration"] == pytest.approx(4.0, abs=0.1) and verbose["text"] == text
    assert verbose["language"] == "en"  # the client's, reported back
    assert [(s["start"], s["end"]) for s in verbose["segments"]] == [(0.0, verbose["duration"])]
    # a CTC model has no timestamps: one cue over the whole clip
    assert post("srt").text == f"1\n00:00:00,000 --> 00:00:04,000\n{text}\n"
    assert post("vtt").text == f"WEBVTT\n\n00:00:00.000 --> 00:00:04.000\n{text}\n"


def test_a_ctc_recognizer_claims_no_language_and_refuses_the_fields_it_cannot_honour(client):
    """It detects no language: without the client's, verbose_json has none (it said
    "english" whatever the audio). OpenAI's fields it has no use for are refused naming them,
    as Whisper's unknown fields are, rather than dropped."""
    wav = media.encode_audio(media.clip_with_speech())

    def post(**fields):
        return client.post("/v1/audio/transcriptions", files={"file": ("speech.wav", wav, "audio/wav")},
                           data={"model": "tiny-asr", **fields})

    verbose = post(response_format="verbose_json")
    assert verbose.status_code == 200, verbose.text
    assert "language" not in verbose.json()
    for field, value in [("temperature", "0"), ("prompt", "Hello."), ("timestamp_granularities[]", "word"),
                         ("colour", "blue")]:
        err = error_of(post(**{field: value}), 422)
        assert err["field"] == field.removesuffix("[]") and "unknown parameter" in err["message"], err
    assert error_of(post(language="English"), 422)["field"] == "language"  # ISO 639-1, as OpenAI's


def test_subtitles_number_their_cues_and_write_each_formats_clock():
    from nodes.transcript import render

    body = {"text": "a b", "segments": [{"start": 0.0, "end": 1.5, "text": " a"},
                                        {"start": 3725.25, "end": 3726.0, "text": "b "}]}
    assert render(body, "srt") == ("1\n00:00:00,000 --> 00:00:01,500\na\n\n"
                                   "2\n01:02:05,250 --> 01:02:06,000\nb\n")
    assert render(body, "vtt") == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\na\n\n"
                                   "01:02:05.250 --> 01:02:06.000\nb\n")
    assert render(body, "text") == "a b" and render(body, "verbose_json") is body


def test_transcriptions_need_a_speech_recognizer(client):
    wav = media.encode_audio(media.clip_with_speech())
    r = client.post("/v1/audio/transcriptions", data={"model": "tiny-resnet"}, files={"file": ("a.wav", wav)})
    assert "is a vision model; transcriptions need a speech" in error_of(r, 422)["message"]
    r = client.post("/v1/audio/transcriptions", data={"model": "silero-vad"}, files={"file": ("a.wav", wav)})
    assert "does not transcribe" in error_of(r, 422)["message"]
    r = client.post("/v1/audio/translations", data={"model": "tiny-asr"}, files={"file": ("a.wav", wav)})
    assert "does not translate" in error_of(r, 422)["message"]
    r = client.post("/v1/audio/transcriptions", data={"model": "tiny-asr", "response_format": "docx"},
                    files={"file": ("a.wav", wav)})
    assert error_of(r, 422)["field"] == "response_format"


# --- bad input: a 4xx naming the problem, and the next request is served --------------------

WAV = media.encode_audio(media.clip_with_speech())
PNG = media.encode_image(media.image(), "png")
MP4 = media.encode_video()


@pytest.mark.parametrize("model_id, data, fmt, status, says", [
    ("tiny-asr", b"\x00\x01garbage" * 64, None, 422, "could not decode the input as audio"),
    ("tiny-asr", WAV[:40], "wav", 422, "could not decode"),                      # truncated header
    ("tiny-asr", PNG, None, 422, "no audio stream"),                            # an image to an audio model
    ("tiny-asr", WAV, "aiff", 415, "format 'aiff' is not supported"),
    ("tiny-asr", b"", "wav", 422, "empty"),
    ("tiny-resnet", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "png", 422, "could not decode the input as an image"),
    ("tiny-resnet", PNG[: len(PNG) // 2], "png", 422, "could not decode"),     # truncated
    ("tiny-resnet", media.encode_audio(media.tone()), None, 422, "could not decode the input as an image"),
    ("tiny-resnet", media.encode_image(media.image(), "bmp"), None, 415, "bmp images are not supported"),
    ("tiny-resnet", media.encode_image(media.image(1, 1), "png"), "png", 422, "1x1"),
    ("tiny-resnet", media.encode_image(media.image(256, 256) * 0, "png"), "png", 422, "max_pixels"),
    ("tiny-resnet", b"\xff" * 100_001, "png", 413, "max_bytes"),
    ("tiny-video", MP4[: len(MP4) // 3], "mp4", 422, "could not decode"),
    ("tiny-video", PNG, None, 415, "video encoded as png is not supported"),     # an image to a video model
])
def test_bad_media_is_a_4xx_naming_the_problem(client, model_id, data, fmt, status, says):
    err = error_of(infer(client, model_id, data, fmt), status)
    assert says in err["message"] and err["model_id"] == model_id
    good = {"tiny-asr": WAV, "tiny-resnet": PNG, "tiny-video": MP4}[model_id]
    ok(infer(client, model_id, good))  # the pipeline keeps serving


def test_malformed_media_inputs(client):
    assert "base64" in error_of(client.post("/v1/infer", json={
        "model_id": "tiny-asr", "input": {"data": "not base64!"}}), 422)["message"]
    assert error_of(client.post("/v1/infer", json={"model_id": "tiny-asr", "input": "hello"}), 422)["field"] == "input"
    assert error_of(client.post("/v1/infer", json={
        "model_id": "tiny-asr", "input": {"data": media.b64(WAV), "url": "http://x"}}), 422)["field"] == "input.url"


def test_audio_codec_outside_the_accepted_formats_is_415():
    from core.config import ModelConfig
    from core.errors import UnsupportedMedia
    from nodes.audio import AudioDecode

    node = AudioDecode({"formats": ["wav", "flac"]}, ModelConfig(model_id="m", modality="audio", pipeline="asr"))
    with pytest.raises(UnsupportedMedia, match="encoded as mp3"):
        node.decode(media.encode_audio(media.tone(), "mp3"), "m")


# --- batching ------------------------------------------------------------------------------

def test_concurrent_requests_are_batched():
    from core.protocol import RequestContext
    from engines.classifier import ImageClassifier
    from nodes.vision import ImageDecode

    cfg = compose(["model=[tiny_resnet]", "pipeline=[vision]", "model.tiny_resnet.engine_kwargs.max_batch_size=8",
                   "model.tiny_resnet.engine_kwargs.batch_wait_timeout_s=0.5"])
    m = cfg.model["tiny_resnet"]

    async def run():
        engine, decode = ImageClassifier(m), ImageDecode(cfg.pipeline["vision"].preprocess.kwargs, m)
        await engine.start()
        await decode.start()
        ctx = RequestContext(request_id="r", model_id=m.model_id)
        payloads = [await decode({"data": media.encode_image(media.image(seed=i))}, ctx) for i in range(8)]
        params = engine.Params(top_k=1)

        async def one(p):
            return [r async for r in engine.infer(p, params, ctx)][0]

        return engine, await asyncio.gather(*(one(p) for p in payloads))

    engine, results = asyncio.run(run())
    assert len(results) == 8 and all(len(r.output) == 1 for r in results)
    assert engine.stats() == {"batches": 1, "items": 8, "mean_batch_size": 8.0}


def test_a_decoded_image_crosses_a_hop_as_the_same_pixels_and_finishes_as_torchvisions_transforms():
    """What the vision node hands an engine in another replica: pickled (as Ray does across a
    handle hop), the cropped view comes back as the same pixels in a tensor of its own, and the
    finishing transform, a few bytes, gives what torchvision's ToDtype + Normalize give."""
    import pickle

    import torch
    from torchvision.transforms import v2

    from core.protocol import MediaPayload
    from nodes.vision import Transforms

    geometry, finish = Transforms().build()
    pixels = geometry(torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8))
    assert not pixels.is_contiguous()  # a crop of the resized image
    wire = pickle.dumps(MediaPayload(data=pixels, info={"width": 320}, finish=finish), protocol=5)
    got = pickle.loads(wire)
    assert got.data.dtype == torch.uint8 and torch.equal(got.data, pixels) and got.info == {"width": 320}
    got.data[0, 0, 0] = 7  # writable, and not the sender's memory
    assert len(pickle.dumps(finish)) < 512
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(Transforms().mean, Transforms().std)])
    assert torch.equal(got.finish(pixels), reference(pixels))
    assert torch.equal(got.finish(pixels.unsqueeze(0))[0], reference(pixels))  # frames of a video too


def test_the_classifier_answers_the_same_whatever_the_layout_its_input_arrives_in():
    """The engine runs its network in channels_last (faster convolutions on a CPU); its
    probabilities are those of the network as loaded, for a decoded batch as the node hands it
    over (a view of the decoder's channels-last frame) and for the same batch after a pickle
    (contiguous, as it arrives across a handle hop)."""
    import pickle

    import torch

    from core.protocol import MediaPayload
    from engines.classifier import ImageClassifier, load_classifier
    from nodes.vision import ImageDecode

    cfg = compose(["model=[tiny_resnet]", "pipeline=[vision]"])
    m = cfg.model["tiny_resnet"]
    engine, decode = ImageClassifier(m), ImageDecode(cfg.pipeline["vision"].preprocess.kwargs, m)
    engine.load()
    asyncio.run(decode.start())
    payloads = [decode.decode(media.encode_image(media.image(seed=i)), m.model_id) for i in range(4)]
    hopped = [pickle.loads(pickle.dumps(p)) for p in payloads]
    assert payloads[0].data.stride()[0] == 1 and hopped[0].data.is_contiguous()  # the two layouts
    reference, _ = load_classifier(m.source)
    with torch.inference_mode():
        expected = reference.eval()(torch.stack([p.finish(p.data).contiguous() for p in payloads])).softmax(-1)
        for batch in (payloads, hopped):
            got = torch.stack(engine.forward([(p, None) for p in batch]))
            assert torch.allclose(got, expected, atol=1e-5)
