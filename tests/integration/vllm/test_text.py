"""Text on real vLLM (CPU), over real HTTP: the OpenAI-compatible routes through the `openai`
client and vLLM's own benchmark client, and the text pipeline on /v1/infer (streaming,
deadlines, disconnects, a dead engine core). The generated tiny Llama has its default
placement, remote_core: AsyncLLM in the ingress, its engine core in a Ray actor of its own.
The embedding model has the real all-MiniLM-L6-v2 weights and its engine in its own
deployment, across a handle hop. Every feature is checked for what it means, not for a 200.

Served with the package's vLLM set (conftest.py).
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

LLM = MODEL = "tiny-llama"
EMBED = "all-minilm-l6-v2"
HI = [{"role": "user", "content": "Hi there"}]
# strict: its arguments follow its schema (OpenAI's meaning, vLLM's since 0.32: without it, a
# named or required call's envelope and name are enforced, and its arguments are free)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}




def infer(http, **body) -> dict:
    r = http.post("/v1/infer", json={"model_id": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(http, **body) -> list[dict | str]:
    events = []
    with http.stream("POST", "/v1/infer", json={"model_id": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def engine_stats() -> dict:
    """The tiny Llama's engine counters, asked of the ingress (where its engine runs)."""
    from ray import serve

    return serve.get_deployment_handle("ingress", app_name="mmserve").stats.remote(MODEL).result()


def refused(http, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    return r.json()["error"]


# --- completions ------------------------------------------------------------------------

def test_n_choices_are_indexed_and_repeat_with_a_seed(client):
    kw = dict(model=LLM, prompt="Once upon", max_tokens=12, n=2, temperature=1.0, seed=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 24


def test_streamed_n_choices_carry_their_index(client):
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(model=LLM, prompt="Once upon", max_tokens=12, n=2,
                                           temperature=1.0, seed=3, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    whole = client.completions.create(model=LLM, prompt="Once upon", max_tokens=12, n=2, temperature=1.0, seed=3)
    assert texts == {c.index: c.text for c in whole.choices}


def test_completion_logprobs_are_vllms_one_per_token(client):
    r = client.completions.create(model=LLM, prompt="The quick", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_echo_returns_the_prompt_first(client):
    r = client.completions.create(model=LLM, prompt="The quick brown", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("The quick brown") and len(r.choices[0].text) > len("The quick brown")


def test_a_list_of_prompts_and_token_id_prompts(client, http):
    r = client.completions.create(model=LLM, prompt=["The quick", "Hello"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    alone = client.completions.create(model=LLM, prompt="Hello", max_tokens=3, temperature=0)
    assert r.choices[1].text == alone.choices[0].text
    ids = http.post("/tokenize", json={"model": LLM, "prompt": "Hello"}).json()["tokens"]
    by_ids = client.completions.create(model=LLM, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == alone.choices[0].text


def test_vllm_sampling_extensions(client, http):
    # ignore_eos and min_tokens: exactly max_tokens come out
    r = client.completions.create(model=LLM, prompt="Hi", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True, "min_tokens": 20, "repetition_penalty": 1.2,
                                              "min_p": 0.01, "skip_special_tokens": True})
    assert r.usage.completion_tokens == 20
    # logit_bias: a +100 bias on one token makes it the only one sampled
    token = http.post("/tokenize", json={"model": LLM, "prompt": " model", "add_special_tokens": False}
                      ).json()["tokens"][0]
    r = client.completions.create(model=LLM, prompt="Hi", max_tokens=4, temperature=0, logit_bias={str(token): 100})
    assert r.choices[0].text == http.post("/detokenize", json={"model": LLM, "tokens": [token] * 4}).json()["prompt"]
    # stop strings, kept in the output with include_stop_str_in_output
    full = client.completions.create(model=LLM, prompt="The quick", max_tokens=24, temperature=0).choices[0].text
    stop = full[4:7]
    cut = client.completions.create(model=LLM, prompt="The quick", max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"include_stop_str_in_output": True})
    assert cut.choices[0].text == full[:full.find(stop) + len(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_choice_and_regex(client, stream):
    def text(**kw):
        r = client.completions.create(model=LLM, prompt="Answer:", max_tokens=20, temperature=1.0, stream=stream, **kw)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    assert text(extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}}) in ("yes", "no", "maybe")
    out = text(extra_body={"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}})
    assert len(out) == 6 and set(out[:3]) <= set("abc") and out[3] == "-" and out[4:].isdigit()


def test_max_tokens_beyond_the_context_names_both_numbers(http):
    err = refused(http, "/v1/completions", {"model": LLM, "prompt": "Hi", "max_tokens": 1_000_000_000})
    assert "1000000000" in err["message"] and "2048" in err["message"] and err["param"] == "max_tokens"
    err = refused(http, "/v1/infer", {"model_id": LLM, "prompt": "Hi", "params": {"max_tokens": 1_000_000_000}})
    assert "1000000000" in err["message"] and "2048" in err["message"] and err["field"] == "params.max_tokens"


# --- chat -------------------------------------------------------------------------------

def test_content_parts_and_chat_logprobs(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    r = client.chat.completions.create(model=LLM, messages=parts, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    joined = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "Hi\nthere"}],
                                            max_tokens=6, temperature=0)
    assert r.choices[0].message.content == joined.choices[0].message.content


def test_streamed_logprobs_content_parts_and_echo(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    whole = client.chat.completions.create(model=LLM, messages=parts, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    streamed = [t for c in client.chat.completions.create(
        model=LLM, messages=parts, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in streamed)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=LLM, prompt="The quick brown", max_tokens=4, temperature=0, echo=True, stream=True))
    assert text.startswith("The quick brown") and len(text) > len("The quick brown")


def test_a_streamed_named_tool_call_carries_parseable_arguments(client):
    name, arguments = None, ""
    for chunk in client.chat.completions.create(
            model=LLM, messages=HI, max_tokens=400, temperature=0, tools=[WEATHER], stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name = call.function.name or name
            arguments += call.function.arguments or ""
    assert name == "get_weather" and json.loads(arguments)["city"] in ("Paris", "Rome")


def test_streamed_chat_n2_with_usage(client):
    seen, usage = set(), None
    for chunk in client.chat.completions.create(model=LLM, messages=HI, max_tokens=5, n=2, temperature=1.0,
                                                seed=1, stream=True, stream_options={"include_usage": True}):
        seen |= {c.index for c in chunk.choices}
        usage = chunk.usage or usage
    assert seen == {0, 1} and usage.completion_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": WEATHER["function"]["parameters"]}}
    r = client.chat.completions.create(model=LLM, messages=HI, max_tokens=400, temperature=0,
                                       response_format=fmt, stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else r.choices[0].message.content
    assert json.loads(text)["city"] in ("Paris", "Rome")


def test_json_object_output_is_json_as_far_as_it_goes(client):
    # any JSON object is allowed: random weights may not close it within max_tokens
    r = client.chat.completions.create(model=LLM, messages=HI, max_tokens=64, temperature=0,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
        with pytest.raises(json.JSONDecodeError, match="Unterminated|Expecting"):
            json.loads(text)


def test_a_named_tool_choice_gives_a_call_whose_arguments_parse(client):
    r = client.chat.completions.create(model=LLM, messages=HI, max_tokens=400, temperature=0, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_required_tool_choice_forces_a_call(client):
    # vLLM's hermes grammar lets "required" make one call or more; the random weights go on
    # making them, so the answer is cut by max_tokens, but it can only be tool calls
    r = client.chat.completions.create(model=LLM, messages=HI, max_tokens=60, temperature=0, tools=[WEATHER],
                                       tool_choice="required")
    choice = r.choices[0]
    if choice.finish_reason == "length":
        assert choice.message.content.startswith('<tool_call>{"name": "get_weather", "arguments": {')
    else:
        assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")


def test_tool_choice_none_and_auto_answer_text(client):
    for choice in ("none", "auto"):  # auto: the model's config names the hermes tool-call parser
        r = client.chat.completions.create(model=LLM, messages=HI, max_tokens=8, temperature=0, tools=[WEATHER],
                                           tool_choice=choice, parallel_tool_calls=False)
        # the random weights never write a <tool_call> block: the parser hands the text back
        assert not r.choices[0].message.tool_calls and r.choices[0].message.content
        assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body,field", [
    ({"n": 0}, "n"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "bogus"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}],
     }, "messages.0.content.0"),
    ({"surprise": 1}, "surprise"),
])
def test_malformed_requests_are_refused_naming_the_field_and_the_model_keeps_serving(http, client, body, field):
    err = refused(http, "/v1/chat/completions", {"model": LLM, "messages": HI, "max_tokens": 4, **body})
    assert field in err["message"] or err.get("param") == field, err
    assert client.chat.completions.create(model=LLM, messages=HI, max_tokens=2).choices[0].message.content is not None


def test_fields_vllm_ignores_are_accepted(client):
    r = client.chat.completions.create(model=LLM, messages=HI, max_tokens=2, store=False, user="u1",
                                       parallel_tool_calls=True, metadata={"k": "v"})
    assert r.usage.completion_tokens == 2


# --- the newer API shapes over the same engine --------------------------------------------

def test_responses_api(client):
    r = client.responses.create(model=LLM, input="Hello", max_output_tokens=6, temperature=0)
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens == 6
    events = [e.type for e in client.responses.create(model=LLM, input="Hello", max_output_tokens=6, stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events


def test_anthropic_messages_api(http):
    body = {"model": LLM, "max_tokens": 6, "messages": HI, "temperature": 0}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "message" and out["usage"]["output_tokens"] == 6 and out["content"][0]["type"] == "text"
    with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as s:
        kinds = [line[len("event: "):] for line in s.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"


# --- embeddings, tokenize, models ---------------------------------------------------------

def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_mean_something_and_batch_like_singles(client):
    texts = ["a cat sits on the mat", "a kitten rests on a rug", "stock markets fell sharply"]
    r = client.embeddings.create(model=EMBED, input=texts)
    v = [d.embedding for d in r.data]
    assert len(v) == 3 and len(v[0]) == 384 and r.usage.prompt_tokens > 0
    assert _cos(v[0], v[1]) > _cos(v[0], v[2]) + 0.3
    for text, batched in zip(texts, v):
        single = client.embeddings.create(model=EMBED, input=text).data[0].embedding
        assert max(abs(x - y) for x, y in zip(single, batched)) < 1e-4


def test_embeddings_as_base64_and_on_infer(http, client):
    floats = client.embeddings.create(model=EMBED, input="hello").data[0].embedding
    raw = http.post("/v1/embeddings", json={"model": EMBED, "input": "hello", "encoding_format": "base64"}).json()
    decoded = struct.unpack(f"<{len(floats)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(x - y) for x, y in zip(decoded, floats)) < 1e-6
    out = http.post("/v1/infer", json={"model_id": EMBED, "input": ["hello", "world"]}).json()
    assert len(out["output"]) == 2 and max(abs(x - y) for x, y in zip(out["output"][0], floats)) < 1e-4
    err = refused(http, "/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 10})
    assert "matryoshka" in err["message"].lower() and "dimensions" in err["message"]
    assert "does not serve chat" in refused(http, "/v1/chat/completions", {"model": EMBED, "messages": HI})["message"]


def test_a_vllm_server_option_set_in_the_config_does_what_it_does_there(http):
    # enable_prompt_tokens_details (conftest.py): vLLM's usage then tells the prompt tokens its
    # prefix cache held; the same long prompt again finds its full blocks there
    prompt = " ".join(f"word{i}" for i in range(150)) + f" {time.time()}"
    body = {"model": LLM, "prompt": prompt, "max_tokens": 1}
    first = http.post("/v1/completions", json=body).json()["usage"]
    second = http.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0, first
    assert second["prompt_tokens"] == first["prompt_tokens"] > 256, first  # two full blocks or more
    assert second["prompt_tokens_details"]["cached_tokens"] >= 128, second  # vLLM's CPU blocks: 128 tokens


QUERY = "What is the capital of France?"
DOCS = ["Bananas are a yellow fruit rich in potassium.", "Paris is the capital and largest city of France.",
        "The Eiffel Tower was built for the 1889 World's Fair.", "Berlin is the capital of Germany."]


def test_rerank_and_score_rank_by_relevance_as_vllms_server_does(http, client):
    # the real all-MiniLM-L6-v2 as a bi-encoder: vLLM scores a pair by its vectors' cosine
    ranked = http.post("/rerank", json={"model": EMBED, "query": QUERY, "documents": DOCS}).json()
    order = [r["index"] for r in ranked["results"]]
    assert order[0] == 1 and order[-1] == 0, ranked  # Paris first, bananas last
    scores = [r["relevance_score"] for r in ranked["results"]]
    assert scores == sorted(scores, reverse=True) and ranked["results"][0]["document"]["text"] == DOCS[1]
    assert ranked["usage"]["prompt_tokens"] > 0
    # Jina's /v1/rerank and Cohere's /v2/rerank are the same ranking; top_n cuts it
    for path in ("/v1/rerank", "/v2/rerank"):
        again = http.post(path, json={"model": EMBED, "query": QUERY, "documents": DOCS, "top_n": 2}).json()
        assert [r["index"] for r in again["results"]] == order[:2]
    # /score gives the same numbers in the documents' order: the embeddings' cosine
    scored = http.post("/score", json={"model": EMBED, "queries": QUERY, "documents": DOCS}).json()
    by_index = {d["index"]: d["score"] for d in scored["data"]}
    for r in ranked["results"]:
        assert abs(by_index[r["index"]] - r["relevance_score"]) < 1e-4
    vectors = [d.embedding for d in client.embeddings.create(model=EMBED, input=[QUERY, DOCS[1]]).data]
    assert abs(by_index[1] - _cos(*vectors)) < 1e-3
    v1 = http.post("/v1/score", json={"model": EMBED, "text_1": QUERY, "text_2": DOCS[1]}).json()
    assert abs(v1["data"][0]["score"] - by_index[1]) < 1e-4
    # /pooling: the pooler's output, the same vector as /v1/embeddings
    pooled = http.post("/pooling", json={"model": EMBED, "input": QUERY}).json()
    assert max(abs(x - y) for x, y in zip(pooled["data"][0]["data"], vectors[0])) < 1e-4
    # a text model answers none of them, a classify route none for an embedding model, and a
    # bad body names its field
    assert "does not serve rerank" in refused(http, "/rerank", {"model": LLM, "query": "q", "documents": ["d"]})["message"]
    assert "does not serve classify" in refused(http, "/classify", {"model": EMBED, "input": "x"})["message"]
    err = refused(http, "/rerank", {"model": EMBED, "documents": DOCS})
    assert err["message"].startswith("query:"), err


def test_tokenize_and_detokenize_round_trip(http):
    r = http.post("/tokenize", json={"model": LLM, "prompt": "Hello there"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    assert http.post("/detokenize", json={"model": LLM, "tokens": r["tokens"]}).json()["prompt"].endswith("Hello there")
    chat = http.post("/tokenize", json={"model": LLM, "messages": HI}).json()
    assert chat["count"] > r["count"]  # the chat template's role markers


def test_models_carry_what_vllms_server_gives(http):
    data = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    llm = data[LLM]
    assert llm["max_model_len"] == 2048 and llm["root"].endswith("tiny-llama") and llm["permission"]
    assert "chat" in llm["openai_routes"] and data[EMBED]["openai_routes"] == [
        "detokenize", "embedding", "pooling", "rerank", "score", "tokenize"]
    assert data[EMBED]["max_model_len"] == 256


# --- vLLM's own benchmark client ----------------------------------------------------------

@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllms_benchmark_client_has_no_failed_request(serve_app, backend, endpoint):
    import argparse

    from vllm.benchmarks.serve import add_cli_args, main

    from engines.checkpoints import resolve_source

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", backend, "--base-url", serve_app, "--endpoint", endpoint, "--model", LLM,
        "--tokenizer", resolve_source("generated:tiny-llama"), "--dataset-name", "random",
        "--random-input-len", "16", "--random-output-len", "16", "--num-prompts", "8",
        "--max-concurrency", "4", "--ignore-eos", "--disable-tqdm"])
    result = main(args)
    assert result["failed"] == 0 and result["completed"] == 8
    assert result["total_output_tokens"] == 8 * 16


def test_the_sweeps_load_generator_measures_the_streamed_tokens(serve_app):
    # what `python -m apps.bench` measures of a text model (the sweep test serves echo only):
    # greedy with ignore_eos, so every request streams exactly max_tokens tokens
    import asyncio

    from apps.loadgen import run_load

    body = {"model_id": MODEL, "prompt": "{n} tokens, streamed",
            "params": {"max_tokens": 24, "temperature": 0, "ignore_eos": True}}
    res = asyncio.run(run_load(f"{serve_app}/v1/infer", body, concurrency=4, requests=12,
                               duration_s=None, warmup_s=0, stream=True))
    assert res.errors == 0 and res.requests == 12, res
    assert res.output_tokens == 12 * 24, res
    assert 0 < res.ttft_p50_ms <= res.p50_ms and res.tpot_p50_ms > 0, res
    # TPOT is the time after the first token spread over the others
    assert res.tpot_p50_ms * 23 <= res.p99_ms, res


# --- /v1/infer's text pipeline; the engine core killed last ---------------------------------

def test_generates_text_with_usage(http):
    out = infer(http, prompt="Hello there", params={"max_tokens": 8, "temperature": 0})
    assert isinstance(out["output"], str) and out["output"]
    assert out["usage"]["completion_tokens"] == 8 and out["usage"]["prompt_tokens"] > 0
    assert out["finish_reason"] == "length"


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_bounds_the_output(http, max_tokens):
    out = infer(http, prompt="Count", params={"max_tokens": max_tokens, "temperature": 0})
    assert out["usage"]["completion_tokens"] == max_tokens


def test_seed_makes_sampling_repeatable(http):
    params = {"max_tokens": 16, "temperature": 1.0, "seed": 7}
    a = infer(http, prompt="Once upon", params=params)["output"]
    b = infer(http, prompt="Once upon", params=params)["output"]
    c = infer(http, prompt="Once upon", params={**params, "seed": 8})["output"]
    assert a == b
    assert a != c


def test_stop_string_stops(http):
    greedy = {"max_tokens": 24, "temperature": 0}
    full = infer(http, prompt="The quick", params=greedy)["output"]
    stop = full[4:7]
    assert stop
    cut = infer(http, prompt="The quick", params={**greedy, "stop": [stop]})
    assert cut["output"] == full[:full.find(stop)]
    assert cut["finish_reason"] == "stop"


def test_chat_messages_go_through_the_chat_template(http):
    from transformers import AutoTokenizer

    from engines.checkpoints import resolve_source

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = infer(http, messages=messages, params={"max_tokens": 4})
    tok = AutoTokenizer.from_pretrained(resolve_source("generated:tiny-llama"))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_stream_matches_the_whole_answer(http):
    params = {"max_tokens": 12, "temperature": 0}
    whole = infer(http, prompt="Stream me", params=params)
    events = stream_events(http, prompt="Stream me", params=params)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 1
    assert "".join(c["output"] for c in chunks) == whole["output"]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("params,field", [
    ({"temperature": 3}, "params.temperature"),
    ({"top_p": 0}, "params.top_p"),
    ({"presence_penalty": -5}, "params.presence_penalty"),
    ({"max_tokens": 0}, "params.max_tokens"),
    ({"beam_width": 2}, "params.beam_width"),
])
def test_invalid_params_are_422(http, params, field):
    r = http.post("/v1/infer", json={"model_id": MODEL, "prompt": "x", "params": params})
    assert r.status_code == 422 and r.json()["error"]["field"] == field


def test_prompt_over_the_context_is_422_with_both_numbers(http):
    r = http.post("/v1/infer", json={"model_id": MODEL, "prompt": "a b c d " * 1000})
    err = r.json()["error"]
    assert r.status_code == 422 and "tokens; the model's context is 2048 tokens" in err["message"]


def test_client_disconnect_aborts_the_generation(serve_app, http):
    assert engine_stats()["running_requests"] == 0
    gone = {"model_id": MODEL, "route": "/v1/infer"}
    before = value(scrape(http), "mmserve_client_disconnects_total", **gone)
    body = {"model_id": MODEL, "prompt": "Go on", "stream": True,
            "params": {"max_tokens": 1900, "temperature": 0}}  # about 6 s of generation here
    with httpx.Client(base_url=serve_app, timeout=60) as client:
        with client.stream("POST", "/v1/infer", json=body) as r:
            lines = r.iter_lines()  # not closed until the block ends: closing it disconnects
            events = 0
            while events < 3:
                events += next(lines).startswith("data: ")
            assert engine_stats()["running_requests"] == 1
        # leaving the block closes the connection mid-stream
    # Well before the ~6 s the generation would need to finish by itself: it was aborted.
    deadline = time.monotonic() + 2
    while engine_stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the engine's own counter
    assert engine_stats()["running_requests"] == 0
    after = scrape(http)  # counted once, as a disconnect and as a response that ended so
    assert value(after, "mmserve_client_disconnects_total", **gone) - before == 1
    assert value(after, "mmserve_requests_total", error="client_disconnected", **gone) >= 1


def test_abandoned_request_without_streaming_ends_at_its_deadline(serve_app):
    """Behind HAProxy (server.http_proxy: haproxy) a client's close reaches the replica only
    when there is something to send it: a request it abandoned before its answer runs on until
    its deadline ends it (test_text_ray_proxy.py: with Serve's Python proxy it stops at once)."""
    body = {"model_id": MODEL, "prompt": "Go on", "params": {"max_tokens": 1900, "temperature": 0,
                                                             "timeout_s": 2}}
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{serve_app}/v1/infer", json=body, timeout=1.0)  # the client gives up
    deadline = t0 + 3.5  # the generation alone would take ~7 s
    while engine_stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the engine's own counter
    assert engine_stats()["running_requests"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_deadline_aborts_the_generation(http, stream):
    body = {"model_id": MODEL, "prompt": "Go on", "stream": stream,
            "params": {"max_tokens": 1900, "temperature": 0, "timeout_s": 0.5}}
    r = http.post("/v1/infer", json=body)
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        err = events[-1]["error"]
    else:
        assert r.status_code == 504
        err = r.json()["error"]
    assert err["type"] == "deadline_exceeded" and "engine" in err["message"]
    deadline = time.monotonic() + 2  # far less than the generation would take
    while engine_stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the engine's own counter
    assert engine_stats()["running_requests"] == 0


def test_openai_client_on_both_routes(serve_app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{serve_app}/v1", api_key="unused")
    assert MODEL in [m.id for m in client.models.list()]

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"

    parts = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == 6

    comp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens == 5
    streamed = "".join(p.choices[0].text for p in client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert streamed == comp.choices[0].text


def test_rays_own_processes_keep_off_the_core_vllms_worker_binds(serve_app):
    """With server.ray_cpus: auto on a host without GPUs, Ray's own processes run on the last
    CPU only, which vLLM's CPU worker leaves free; the ingress (vLLM's frontend), the engine
    core's actor, the embedding model's replica and HAProxy run on every CPU."""
    import os

    from apps.serving import local_gpu_count
    from core import cpus

    machine = set(os.sched_getaffinity(0))
    if local_gpu_count() or len(machine) < 2:
        pytest.skip("auto confines Ray only on a host without GPUs with two CPUs or more")
    last = {max(machine)}

    def masks(name: str) -> list[set[int]]:
        """CPUs of each process of this module's Ray named ``name`` (``cpus.processes``)."""
        found = [os.sched_getaffinity(pid) for pid in cpus.processes(name, under=os.getpid())]
        assert found, f"no process {name}"
        return found

    for name in ("gcs_server", "raylet", "ray::ServeController", "ray::ProxyActor"):
        assert all(m == last for m in masks(name)), name
    for name in ("ray::ServeReplica:mmserve:ingress", "ray::CoreHost",
                 "ray::ServeReplica:mmserve.",  # the embedding model's engine
                 "haproxy", "ray::HAProxyManager"):  # on the path of every request
        found = masks(name)
        assert all(m == machine for m in found), f"{name} on {found}"
    for worker in masks("VLLM::Worker"):  # it binds its threads where Ray is not
        assert worker and not worker & last


def test_the_models_processes_run_at_niceness_0_as_under_vllms_own_server(serve_app):
    """server.serve_env's RAY_worker_niceness: 0 reaches Ray's workers: every thread of the
    ingress (vLLM's frontend), the engine core's actor and vLLM's CPU worker runs at 0, where Ray
    would start them at 15."""
    import contextlib
    import os

    from core import cpus

    for name in ("ray::ServeReplica:mmserve:ingress", "ray::CoreHost", "VLLM::Worker"):
        pids = cpus.processes(name, under=os.getpid())
        assert pids, f"no process {name}"
        for pid in pids:
            nices = set()
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    nices.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
            assert nices == {0}, f"{name} ({pid}) runs at {sorted(nices)}"


def test_model_is_listed_ready(http):
    one = http.get(f"/v1/models/{MODEL}").json()
    assert one["status"] == "ready" and one["engine"] == "vllm"
    assert one["engine_kwargs"]["max_model_len"] == 2048


# --- metrics ------------------------------------------------------------------------------

def scrape(http) -> list:
    from tests.support import metric_families

    return metric_families(http.get("/metrics"))


def value(families, sample: str, **labels) -> float:
    from core.metrics import sample_value

    return sample_value(families, sample, **labels)


def test_metrics_count_a_known_mix_and_carry_vllms_own(http, client):
    """Through HAProxy, the ingress and the embedding model's engine replica (another process):
    exact counts by model, route, status and error, histograms that count every request once,
    and vLLM's own metrics under their `vllm:` names with the model's `model_id` (the tiny
    Llama's from its AsyncLLM in the ingress)."""
    before = scrape(http)
    short = {"max_tokens": 8, "temperature": 0}
    for _ in range(3):
        infer(http, prompt="Hello", params=short)
    for _ in range(2):
        assert stream_events(http, prompt="Hello", params=short)[-1] == "[DONE]"
    client.completions.create(model=LLM, prompt="Hello", max_tokens=8, temperature=0)
    list(client.completions.create(model=LLM, prompt="Hello", max_tokens=8, temperature=0, stream=True))
    for _ in range(2):
        assert http.post("/v1/infer", json={"model_id": MODEL, "prompt": "x", "params": {"top_k": -5}}).status_code == 422
    for _ in range(2):
        assert http.post("/v1/infer", json={"model_id": "no-such-model", "prompt": "x"}).status_code == 404
    late = {"model_id": MODEL, "prompt": "Go on", "params": {"max_tokens": 1900, "timeout_s": 0.3}}
    assert http.post("/v1/infer", json=late).status_code == 504

    def delta(after, sample, **labels):
        return value(after, sample, **labels) - value(before, sample, **labels)

    def vllm_done(after):  # vLLM's stat logger records after it hands the outputs over
        return delta(after, "vllm:request_success_total", model_id=LLM) >= 7

    deadline = time.monotonic() + 10
    while not vllm_done(after := scrape(http)) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling vLLM's own counter
    infer_ = {"model_id": LLM, "route": "/v1/infer"}
    completions = {"model_id": LLM, "route": "/v1/completions"}
    assert delta(after, "mmserve_requests_total", code="200", error="", **infer_) == 5
    assert delta(after, "mmserve_requests_total", code="200", error="", **completions) == 2
    assert delta(after, "mmserve_requests_total", code="422", error="invalid_request", **infer_) == 2
    assert delta(after, "mmserve_requests_total", model_id="", route="/v1/infer", code="404",
                 error="model_not_found") == 2
    assert delta(after, "mmserve_requests_total", code="504", error="deadline_exceeded", **infer_) == 1
    assert delta(after, "mmserve_request_duration_seconds_count", **infer_) == 8
    assert delta(after, "mmserve_request_duration_seconds_count", **completions) == 2
    assert delta(after, "mmserve_time_to_first_token_seconds_count", model_id=LLM) == 3  # the streams
    assert delta(after, "mmserve_node_duration_seconds_count", model_id=LLM, node="engine") == 8
    # time per output token: every generation of 2 tokens or more but the non-streamed
    # completion (vLLM hands that one over whole); the late one may have had time for 2
    assert 6 <= delta(after, "mmserve_time_per_output_token_seconds_count", model_id=LLM) <= 7
    assert value(after, "mmserve_requests_in_flight", model_id=LLM) == 0
    assert value(after, "mmserve_model_status", model_id=LLM, status="ready") == 1
    assert value(after, "mmserve_replica_starts_total", deployment="ingress") == 1

    # vLLM's own, from the ingress (the Llama's AsyncLLM) and each engine replica, under vLLM's
    # names and labels plus model_id: every vLLM model of the package's set
    running = [s for f in after if f.name == "vllm:num_requests_running" for s in f.samples]
    assert running and all(s.labels["model_id"] == s.labels["model_name"] for s in running)
    assert {s.labels["model_id"] for s in running} == {LLM, EMBED, "tiny-whisper", "tiny-qwen2-vl"}
    assert delta(after, "vllm:time_to_first_token_seconds_count", model_id=LLM) >= 7
    assert delta(after, "vllm:prompt_tokens_total", model_id=LLM) > 0
    assert {(s.labels["deployment"], s.labels["model_id"]) for s in running} == {
        ("ingress", LLM), (f"{EMBED}.engine", EMBED), ("tiny-whisper.engine", "tiny-whisper"),
        ("tiny-qwen2-vl.engine", "tiny-qwen2-vl")}


def test_dead_engine_core_gives_its_model_503_then_comes_back_while_the_other_serves(serve_app, http):
    """Kept last: under load on both models, it kills the tiny Llama's vLLM engine core (the
    process of its core actor: killing the actor is the same). The Llama answers 503 (never a
    hang, never another error) until its engine has started a core again by itself; the
    embedding model, served by the same ingress, fails nothing meanwhile; the ingress is not
    restarted."""
    import threading

    from tests.support import engine_core_processes

    DOWN = "503 not_ready"

    deadline = time.monotonic() + 10
    while not (cores := engine_core_processes(MODEL)) and time.monotonic() < deadline:
        time.sleep(0.5)  # a /proc read can miss a process for a moment; look again
    assert cores, "no vLLM engine core process found"

    stop = threading.Event()
    codes: dict[str, list] = {MODEL: [], EMBED: []}  # 200, or the status and the error's type
    bodies = {MODEL: ("/v1/completions", {"model": MODEL, "prompt": "still there?", "max_tokens": 16}),
              EMBED: ("/v1/embeddings", {"model": EMBED, "input": "still there?"})}

    def load(model: str) -> None:
        path, body = bodies[model]
        with httpx.Client(base_url=serve_app, timeout=30) as c:
            while not stop.is_set():
                r = c.post(path, json=body)
                codes[model].append(200 if r.status_code == 200 else f"{r.status_code} {r.json()['error']['type']}")
                # paced (at most 5 a second per client): steady load that leaves most of the
                # 2 cores to the engine's restart
                time.sleep(0.2)

    workers = [threading.Thread(target=load, args=(m,), daemon=True) for m in (MODEL, MODEL, EMBED, EMBED)]
    for w in workers:
        w.start()
    try:
        while len(codes[MODEL]) < 4:
            time.sleep(0.1)  # until both are under load
        for p in cores:
            p.kill()
        deadline = time.monotonic() + 30
        while DOWN not in codes[MODEL] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert DOWN in codes[MODEL], "the engine never noticed its core was gone"
        assert http.get(f"/v1/models/{MODEL}").json()["status"] == "recovering"
        deadline = time.monotonic() + 240
        while http.get("/ready", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(1)  # the engine starts its core again, vLLM loads the model
        seen = len(codes[MODEL])
        while len(codes[MODEL]) < seen + 4:
            time.sleep(0.1)  # a few answers after it came back
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert set(codes[MODEL]) == {200, DOWN} and codes[MODEL][-1] == 200
    assert set(codes[EMBED]) == {200}, f"the other model failed: {sorted(set(codes[EMBED]))}"
    after = scrape(http)
    assert value(after, "mmserve_replica_starts_total", deployment="ingress") == 1
    assert engine_core_processes(MODEL) and not any(p.is_running() for p in cores)
