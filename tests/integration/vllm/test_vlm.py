"""Vision-language chat on real vLLM (CPU), over real HTTP: the generated tiny Qwen2-VL behind
``/v1/chat/completions`` through the ``openai`` client, and on ``/v1/infer``. Images and a video
are data: URLs; what vLLM renders is checked through ``/tokenize`` (vLLM's own rendering of the same
messages): one ``<|vision_start|><|image_pad|>...<|vision_end|>`` per image, the pad repeated
as many times as the image processor makes tokens of that image. (An image part sent to a
text-only model is refused in tests/integration/vllm/test_text.py.)

Served with the package's vLLM set (conftest.py).
"""

from __future__ import annotations

import json

import pytest

from tests import media
from tests.media import data_url

pytestmark = pytest.mark.integration

MODEL = "tiny-qwen2-vl"
SMALL = media.encode_image(media.image(64, 48), "png")
LARGE = media.encode_image(media.image(640, 480), "jpeg")


def user(*images: tuple[bytes, str], text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(d, k)}} for d, k in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]




@pytest.fixture(scope="module")
def vocab(serve_app):
    """Token ids of the placeholders, and the tokens the image processor makes of each image."""
    from transformers import AutoProcessor

    from engines.checkpoints import resolve_source
    from tests.media import image

    processor = AutoProcessor.from_pretrained(resolve_source("generated:tiny-qwen2-vl"))
    ids = processor.tokenizer.convert_tokens_to_ids
    merge = processor.image_processor.merge_size ** 2
    tokens = {size: int(processor.image_processor(images=[image(*size).permute(1, 2, 0).numpy()],
                                                  return_tensors="pt")["image_grid_thw"].prod()) // merge
              for size in ((64, 48), (640, 480))}
    return {"start": ids("<|vision_start|>"), "pad": ids("<|image_pad|>"), "end": ids("<|vision_end|>"),
            "video": ids("<|video_pad|>"), "tokens": tokens}


def rendered(http, messages) -> list[int]:
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages, "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def runs_of(tokens: list[int], v: dict, pad: str = "pad") -> list[int]:
    """The length of each <|vision_start|> pad... <|vision_end|> run, in order."""
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] == v["start"]:
            j = i + 1
            while tokens[j] == v[pad]:
                j += 1
            assert tokens[j] == v["end"], "a placeholder run that does not close"
            out.append(j - i - 1)
            i = j
        i += 1
    return out


def test_a_chat_with_one_image_renders_its_placeholder_once(client, http, vocab):
    messages = user((SMALL, "png"))
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens == 6
    tokens = rendered(http, messages)
    assert runs_of(tokens, vocab) == [vocab["tokens"][(64, 48)]] == [4]
    assert r.usage.prompt_tokens == len(tokens)  # what vLLM generated from is that prompt


def test_two_images_give_two_placeholders_each_of_its_own_size(client, http, vocab):
    messages = user((SMALL, "png"), (LARGE, "jpeg"), text="Which one is brighter?")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    tokens = rendered(http, messages)
    assert runs_of(tokens, vocab) == [vocab["tokens"][(64, 48)], vocab["tokens"][(640, 480)]]
    assert r.usage.prompt_tokens == len(tokens)
    only_small = client.chat.completions.create(model=MODEL, messages=user((SMALL, "png"), text="Which one is brighter?"),
                                                max_tokens=4, temperature=0)
    assert only_small.usage.prompt_tokens == len(tokens) - vocab["tokens"][(640, 480)] - 2


@pytest.mark.parametrize("part, status, says", [
    ({"type": "image_url", "image_url": {"url": data_url(b"\x89PNG broken" * 20)}}, 422, "could not decode"),
    ({"type": "image_url", "image_url": {"url": data_url(media.encode_image(media.image(1200, 1000), "jpeg"),
                                                         "jpeg")}}, 422, "max_pixels"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, 400, "not fetched"),
])
def test_a_bad_image_is_a_4xx_naming_its_part_and_the_model_serves_on(http, part, status, says):
    body = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == "messages.0.content.1" and says in err["message"], err
    ok = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": user((SMALL, "png"))})
    assert ok.status_code == 200, ok.text


def test_a_video_part_is_checked_rendered_once_and_answered(client, http, vocab):
    video = data_url(media.encode_video(), "mp4", "video")
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                             {"type": "text", "text": "What happens?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    tokens = rendered(http, messages)
    (run,) = runs_of(tokens, vocab, pad="video")  # one placeholder, expanded to the frames' tokens
    assert run > 0 and vocab["pad"] not in tokens
    assert r.usage.prompt_tokens == len(tokens)
    bad = [{"role": "user", "content": [{"type": "video_url", "video_url": {
        "url": data_url(b"not a video" * 40, "mp4", "video")}}]}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": bad})
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages.0.content.0", r.text


def test_more_images_than_the_model_takes_is_a_400(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                "messages": user(*[(SMALL, "png")] * 3)})
    assert r.status_code == 400 and "limit_mm_per_prompt" in r.json()["error"]["message"], r.text


def test_infer_takes_chat_messages_with_images_streamed_or_not(http, client):
    messages = user((SMALL, "png"))
    r = http.post("/v1/infer", json={"model_id": MODEL, "messages": messages,
                                     "params": {"max_tokens": 6, "temperature": 0}})
    assert r.status_code == 200, r.text
    out = r.json()
    same = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert out["output"] == same.choices[0].message.content  # greedy: the route does not matter
    assert out["usage"] == {"prompt_tokens": same.usage.prompt_tokens, "completion_tokens": 6}
    events = []
    with http.stream("POST", "/v1/infer", json={"model_id": MODEL, "messages": messages, "stream": True,
                                                "params": {"max_tokens": 6, "temperature": 0}}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    assert "".join(e["output"] for e in events) == out["output"]
    r = http.post("/v1/infer", json={"model_id": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"junk" * 30)}}]}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages.0.content.0", r.text


def test_models_list_what_it_takes(http):
    card = http.get(f"/v1/models/{MODEL}").json()
    assert card["inputs"] == ["text", "image", "video"] and "chat" in card["openai_routes"]
    assert card["status"] == "ready" and card["max_model_len"] == 1024
