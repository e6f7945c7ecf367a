"""The chat_media node: every image part of a chat checked by the image node's decoder and
limits, named when refused; URLs fetched only from allowed hosts, within the byte limit."""

from __future__ import annotations

import asyncio
import http.server
import threading

import pytest

from apps.config import compose
from core.errors import InvalidField, InvalidParameter, PayloadTooLarge, UnsupportedMedia
from core.protocol import OpenAIBody, RequestContext
from nodes.chat_media import ChatMedia
from tests import media
from tests.media import data_url

PNG = media.encode_image(media.image(64, 48), "png")


def node(*overrides: str, **kwargs) -> ChatMedia:
    cfg = compose(["model=[tiny_qwen2_vl]", "pipeline=[vlm]", *overrides])
    spec = cfg.pipeline["vlm"].preprocess
    n = ChatMedia({**spec.kwargs, **kwargs}, cfg.model["tiny_qwen2_vl"])
    asyncio.run(n.start())
    return n


def chat(*urls: str) -> dict:
    parts = [{"type": "text", "text": "What is it?"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "tiny-qwen2-vl", "messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": parts}]}


def run(n: ChatMedia, body: dict):
    ctx = RequestContext(request_id="r", model_id="tiny-qwen2-vl")
    return asyncio.run(n(OpenAIBody("chat", body), ctx))


def test_data_url_images_pass_unchanged_and_a_prompt_becomes_a_user_message():
    n = node()
    body = chat(data_url(PNG), data_url(media.encode_image(media.image(), "jpeg"), "jpeg"))
    assert run(n, body).body == chat(data_url(PNG), data_url(media.encode_image(media.image(), "jpeg"), "jpeg"))
    ctx = RequestContext(request_id="r", model_id="m")
    assert asyncio.run(n("Hi", ctx)) == {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("url, error, says", [
    (data_url(b"not an image" * 8), InvalidField, "could not decode"),
    (data_url(media.encode_image(media.image(4, 4), "png")), InvalidField, "min_side"),
    (data_url(media.encode_image(media.image(), "bmp"), "bmp"), UnsupportedMedia, "not supported"),
    ("data:image/png;base64,@@@", InvalidField, "base64"),
    ("data:text/plain,hello", InvalidParameter, "data: URL"),
    ("https://example.com/cat.png", InvalidParameter, "not fetched"),
    ("file:///etc/passwd", InvalidParameter, "not fetched"),
])
def test_a_bad_image_is_refused_naming_its_part(url, error, says):
    with pytest.raises(error) as e:
        run(node(), chat(data_url(PNG), url))
    assert e.value.field == "messages.1.content.2" and says in e.value.message, e.value.message
    assert e.value.message.startswith("messages.1.content.2")


def test_every_routes_image_urls_are_checked():
    n = node()
    bad = data_url(b"junk" * 20)
    responses = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Hi"}, {"type": "input_image", "image_url": bad}]}]}
    with pytest.raises(InvalidField) as e:
        asyncio.run(n(OpenAIBody("responses", responses), RequestContext(request_id="r", model_id="m")))
    assert e.value.field == "input.0.content.1"
    anthropic = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}]}
    with pytest.raises(InvalidParameter) as e:  # /v1/messages: vLLM would fetch it
        asyncio.run(n(OpenAIBody("messages", anthropic), RequestContext(request_id="r", model_id="m")))
    assert e.value.field == "messages.0.content.0.source" and "not fetched" in e.value.message
    with pytest.raises(InvalidParameter) as e:  # /tokenize takes chat messages too
        asyncio.run(n(OpenAIBody("tokenize", chat("http://example.com/x.png")), RequestContext(request_id="r", model_id="m")))
    assert e.value.field == "messages.1.content.1"


def test_limits_are_the_pipelines():
    with pytest.raises(PayloadTooLarge) as e:
        run(node(max_bytes=100), chat(data_url(PNG)))
    assert e.value.field == "messages.1.content.1" and "max_bytes" in e.value.message
    with pytest.raises(InvalidParameter) as e:  # the model's vLLM limit: 2 images
        run(node(), chat(data_url(PNG), data_url(PNG), data_url(PNG)))
    assert e.value.field == "messages" and "limit_mm_per_prompt" in e.value.message


@pytest.fixture
def image_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = PNG if self.path == "/cat.png" else b"x" * 10_000
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_urls_of_allowed_hosts_are_fetched_here_and_inlined(image_server):
    n = node(url_domains=["127.0.0.1"])
    out = run(n, chat(f"{image_server}/cat.png")).body
    assert out["messages"][1]["content"][1]["image_url"]["url"] == data_url(PNG)  # vLLM fetches nothing
    with pytest.raises(PayloadTooLarge) as e:
        run(node(url_domains=["127.0.0.1"], max_bytes=5000), chat(f"{image_server}/big.png"))
    assert e.value.field == "messages.1.content.1"
    with pytest.raises(InvalidParameter):
        run(node(url_domains=["localhost"]), chat(f"{image_server}/cat.png"))  # another host


def video_part(data: bytes, kind: str = "mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(data, kind, "video")}}


def test_video_parts_are_checked_by_the_video_node_within_their_own_count():
    no_video = "model.tiny_qwen2_vl.engine_kwargs.limit_mm_per_prompt={image: 2, video: 0}"
    body = {"messages": [{"role": "user", "content": [video_part(media.encode_video()), {"type": "text", "text": "?"}]}]}
    assert run(node(), body).body == body
    with pytest.raises(InvalidParameter) as e:
        run(node(no_video), body)
    assert "0 per request" in e.value.message
    bad = {"messages": [{"role": "user", "content": [video_part(b"not a video" * 30)]}]}
    with pytest.raises(InvalidField) as e:
        run(node(), bad)
    assert e.value.field == "messages.0.content.0" and "could not decode" in e.value.message
    wrong = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(PNG)}}]}]}
    with pytest.raises(InvalidParameter) as e:  # an image where a video belongs
        run(node(), wrong)
    assert "video data: URL" in e.value.message
    assert node().inputs_of(node().model) == ["text", "image", "video"]
    assert ChatMedia.inputs_of(node(no_video).model) == ["text", "image"]
