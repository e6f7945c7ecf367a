"""How mmserve reads vLLM's request surface, without an engine: vLLM's request models (imported,
not copied), strictness on fields neither vLLM nor OpenAI knows, and /v1/infer's sampling
params kept in step with vLLM's names."""

from __future__ import annotations

import pytest

from core.errors import InvalidParameter
from engines.vllm import EmbedParams, TextParams
from engines.vllm_openai import ROUTES, parse_request, routes_for


def test_every_infer_param_is_vllms_field_of_the_same_name():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

    assert set(TextParams.model_fields) <= set(CompletionRequest.model_fields)
    assert set(EmbedParams.model_fields) <= set(EmbeddingCompletionRequest.model_fields)


def test_speech_params_are_vllms_fields_and_become_its_request_models():
    from vllm.entrypoints.speech_to_text.transcription.protocol import TranscriptionRequest
    from vllm.entrypoints.speech_to_text.translation.protocol import TranslationRequest

    from engines.whisper import TranscriptionParams, VLLMTranscriber, not_in_translation

    mine = set(TranscriptionParams.model_fields) - {"task"}
    assert mine <= set(TranscriptionRequest.model_fields)
    assert not_in_translation() == mine - set(TranslationRequest.model_fields)
    assert "timestamp_granularities" in not_in_translation()
    build = VLLMTranscriber._request  # needs no engine
    req = build(None, TranscriptionParams(language="de", response_format="srt", temperature=0.2), "m")
    assert type(req) is TranscriptionRequest and req.response_format == "verbose_json"  # srt is ours
    assert (req.language, req.temperature, req.model) == ("de", 0.2, "m")
    req = build(None, TranscriptionParams(task="translate", prompt="p"), "m")
    assert type(req) is TranslationRequest and req.prompt == "p"
    with pytest.raises(InvalidParameter) as e:
        build(None, TranscriptionParams(task="translate", timestamp_granularities=["segment"]), "m")
    assert e.value.field == "timestamp_granularities"
    req = build(None, TranscriptionParams(task="translate", top_p=0.5), "m")  # vLLM 0.32 takes it
    assert req.top_p == 0.5


def test_every_route_names_a_vllm_request_model_and_handler():
    import importlib

    for name, route in ROUTES.items():
        module, attr = route.request.split(":")
        assert getattr(importlib.import_module(module), attr), name
    assert routes_for("generate") == {"chat", "completion", "responses", "messages", "tokenize", "detokenize"}
    assert routes_for("embed") == {"embedding", "score", "rerank", "pooling", "tokenize", "detokenize"}
    assert routes_for("classify") == {"classify", "score", "rerank", "pooling", "tokenize", "detokenize"}


def test_requests_parse_into_vllms_models():
    chat = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}]}], "n": 2, "logprobs": True, "top_logprobs": 2,
        "repetition_penalty": 1.0, "min_tokens": 1, "response_format": {"type": "json_object"}}, "m")
    assert type(chat).__name__ == "ChatCompletionRequest" and chat.n == 2
    comp = parse_request("completion", {"model": "m", "prompt": [[1, 2, 3]], "echo": True, "logprobs": None,
                                        "repetition_penalty": 1.0}, "m")
    assert comp.prompt == [[1, 2, 3]]
    emb = parse_request("embedding", {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}, "m")
    assert type(emb).__name__ == "EmbeddingCompletionRequest"


def test_a_field_neither_vllm_nor_openai_knows_is_refused_naming_it():
    with pytest.raises(InvalidParameter) as e:
        parse_request("chat", {"model": "m", "messages": [], "temprature": 0.5}, "m")
    assert e.value.field == "temprature" and e.value.status == 400


def test_openais_fields_that_vllm_ignores_are_accepted(caplog):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": {"k": "v"},
            "prediction": {"type": "content", "content": "x"}}
    assert parse_request("chat", body, "m").messages
    assert "metadata" in caplog.text and "prediction" in caplog.text


def test_invalid_values_name_their_field():
    with pytest.raises(InvalidParameter) as e:
        parse_request("completion", {"model": "m", "prompt": "x", "max_tokens": "many"}, "m")
    assert e.value.field == "max_tokens"
    with pytest.raises(InvalidParameter) as e:  # a model-level check of vLLM's: its parameter
        parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "m")
    assert e.value.field == "tool_choice" and "does not match" in e.value.message


def test_min_tokens_cannot_exceed_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        TextParams(max_tokens=4, min_tokens=5)
