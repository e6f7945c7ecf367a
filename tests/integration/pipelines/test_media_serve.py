"""Audio, vision and video models on Ray Serve, each engine in its own deployment: both input
encodings over real HTTP, the transcription route, bad input, and batching across the handle."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests import media

pytestmark = pytest.mark.integration

OVERRIDES = ["model=[silero_vad,tiny_asr,tiny_resnet,tiny_video]", "pipeline=[vad,asr,vision,video]",
             "deployment=light"]
MODELS = {"silero-vad": "audio", "tiny-asr": "audio", "tiny-resnet": "vision", "tiny-video": "video"}


def test_models_are_listed_ready_with_their_modality(serve_app):
    data = httpx.get(f"{serve_app}/v1/models", timeout=30).json()["data"]
    assert {m["id"]: m["modality"] for m in data} == MODELS
    assert {m["status"] for m in data} == {"ready"}


def test_every_modality_over_json_and_multipart(serve_app):
    wav = media.encode_audio(media.clip_with_speech())
    png = media.encode_image(media.image(), "png")
    mp4 = media.encode_video()
    with httpx.Client(base_url=serve_app, timeout=60) as c:
        for model_id, data, name in [("silero-vad", wav, "a.wav"), ("tiny-asr", wav, "a.wav"),
                                     ("tiny-resnet", png, "a.png"), ("tiny-video", mp4, "a.mp4")]:
            as_json = c.post("/v1/infer", json={"model_id": model_id, "input": {"data": media.b64(data)}})
            as_form = c.post("/v1/infer", data={"model_id": model_id}, files={"file": (name, data)})
            assert as_json.status_code == as_form.status_code == 200, (as_json.text, as_form.text)
            assert as_json.json()["output"] == as_form.json()["output"]
        seg, = c.post("/v1/infer", data={"model_id": "silero-vad"}, files={"file": ("a.wav", wav)}).json()["output"]["segments"]
        assert 0.8 <= seg["start_s"] <= 1.2 and 2.3 <= seg["end_s"] <= 2.8
        r = c.post("/v1/audio/transcriptions", data={"model": "tiny-asr"}, files={"file": ("a.wav", wav)})
        assert r.status_code == 200 and isinstance(r.json()["text"], str)


def test_bad_media_is_4xx_and_the_engine_keeps_serving(serve_app):
    png = media.encode_image(media.image(), "png")
    with httpx.Client(base_url=serve_app, timeout=60) as c:
        for data in [png[:100], b"junk" * 10, media.encode_image(media.image(1, 1), "png")]:
            r = c.post("/v1/infer", json={"model_id": "tiny-resnet", "input": {"data": media.b64(data)}})
            assert r.status_code == 422 and "input.data" in r.json()["error"]["message"], r.text
        r = c.post("/v1/infer", json={"model_id": "tiny-video", "input": {"data": media.b64(png)}})
        assert r.status_code == 415, r.text
        assert c.post("/v1/infer", json={"model_id": "tiny-resnet", "input": {"data": media.b64(png)}}).status_code == 200


def scrape(serve_app) -> list:
    from tests.support import metric_families

    return metric_families(httpx.get(f"{serve_app}/metrics", timeout=30))


def test_concurrent_requests_are_batched_in_the_engine_deployment(serve_app):
    """32 images at once through the vision engine (``instances: 2``, so two batches at a time)."""
    from ray import serve

    from core.metrics import sample_value

    engine = serve.get_deployment_handle("tiny-resnet.engine", "mmserve.tiny-resnet.engine")
    before = engine.stats.remote().result()
    scraped = scrape(serve_app)
    bodies = [{"model_id": "tiny-resnet", "input": {"data": media.b64(media.encode_image(media.image(seed=i)))}}
              for i in range(32)]

    async def burst():
        async with httpx.AsyncClient(base_url=serve_app, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/infer", json=b) for b in bodies))

    answers = asyncio.run(burst())
    assert {r.status_code for r in answers} == {200}
    after = engine.stats.remote().result()
    items, batches = after["items"] - before["items"], after["batches"] - before["batches"]
    assert items == 32 and batches < 32, (items, batches)
    # the engine replica's batch metrics, through the ingress's /metrics, agree with its stats
    now = scrape(serve_app)

    def delta(sample):
        return (sample_value(now, sample, model_id="tiny-resnet", deployment="tiny-resnet.engine")
                - sample_value(scraped, sample, model_id="tiny-resnet", deployment="tiny-resnet.engine"))

    assert delta("mmserve_batch_size_count") == batches
    assert delta("mmserve_batch_size_sum") == items
    assert delta("mmserve_batch_wait_seconds_count") == items
    # batched, over two instances, each request still gets its own image's labels
    outputs = [r.json()["output"] for r in answers]
    assert len({str(o) for o in outputs}) > 1
    with httpx.Client(base_url=serve_app, timeout=60) as c:
        for i in (0, 13, 31):  # alone, as the same image in a batch (scores to float32's rounding)
            alone = c.post("/v1/infer", json=bodies[i]).json()["output"]
            assert [x["label"] for x in alone] == [x["label"] for x in outputs[i]]
            assert [x["score"] for x in alone] == pytest.approx([x["score"] for x in outputs[i]], abs=1e-4)


def test_every_readme_call_for_the_media_models_answers_as_the_readme_says(serve_app, tmp_path):
    """The README's quick-start calls of these models (voice activity, recognition, an image, a
    video), with the samples its command writes (``tests/readme_calls.py``)."""
    from tests.readme_calls import served_calls

    done = served_calls(serve_app, tmp_path, set(MODELS))
    assert {m for c in done for m in c.models} == set(MODELS), [c.command[:60] for c in done]
