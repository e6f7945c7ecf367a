"""Several GPUs per replica, and shares of one: what a config reserves, checked against a given
cluster before anything starts (no GPU is needed to check the arithmetic; docs/deployment.md
says what has run on one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apps.builder import gpu_group_options
from apps.config import compose
from core.validate import ConfigError, check_resources, resource_demands

ROOT = Path(__file__).resolve().parents[2]
HUB = ["deployment=gpu", "model=llm", "model.llm.source=Qwen/Qwen3-0.6B"]


def test_tensor_and_pipeline_parallel_reserve_their_gpus_together_per_replica():
    cfg = compose([*HUB, "model.llm.deployment.placement=engine", "++model.llm.deployment.engine.num_replicas=3",
                   "+model.llm.engine_kwargs.tensor_parallel_size=2",
                   "+model.llm.engine_kwargs.pipeline_parallel_size=2"])
    opts = gpu_group_options(cfg.model["llm"])
    assert opts["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1.0}] + [{"GPU": 1.0}] * 3
    assert opts["placement_group_strategy"] == "PACK"
    assert opts["ray_actor_options"]["num_gpus"] == 0  # the replica sits in the first bundle
    demand = {d.key: d for d in resource_demands(cfg)}["model.llm.deployment.engine"]
    assert (demand.replicas, demand.gpus) == (3, 12)
    check_resources(cfg, cpus=16, gpus=12)
    with pytest.raises(ConfigError) as err:
        check_resources(cfg, cpus=16, gpus=8)
    (key, msg), = err.value.problems
    assert key == "model.llm.deployment.engine.ray_actor_options.num_gpus"
    assert "12 GPUs in total" in msg and "the cluster has 8" in msg


def test_the_text_default_placement_reserves_them_for_its_core_actor():
    cfg = compose([*HUB, "+model.llm.engine_kwargs.tensor_parallel_size=4"])
    assert cfg.model["llm"].deployment.placement == "remote_core"
    demand = {d.key: d for d in resource_demands(cfg)}["model.llm.deployment.engine"]
    assert demand.gpus == 4  # one core actor per ingress replica, four GPUs in its group
    from engines.vllm import VLLMEngine

    model = cfg.model["llm"]
    assert VLLMEngine.hosting(model).gpu_bundles(1, 1) == [{"CPU": 1, "GPU": 1.0}] + [{"GPU": 1.0}] * 3
    # a replica pinned by a custom resource carries it in its first bundle, as Serve requires;
    # one without CPUs of its own asks for none there
    pinned = VLLMEngine.hosting(model).gpu_bundles(0, 1, {"node2": 1})
    assert pinned == [{"GPU": 1.0, "node2": 1}] + [{"GPU": 1.0}] * 3
    one = compose(HUB).model["llm"]  # one GPU: the actor's own num_gpus, no group
    assert VLLMEngine.hosting(one).gpu_bundles(1, 1) is None and gpu_group_options(one) == {}


def test_several_gpus_need_whole_gpus_and_a_deployment_of_their_own():
    with pytest.raises(ConfigError) as err:
        compose([*HUB, "+model.llm.engine_kwargs.tensor_parallel_size=2",
                 "++model.llm.deployment.engine.ray_actor_options.num_gpus=0.5"])
    found = dict(err.value.problems)
    assert "set 1" in found["model.llm.deployment.engine.ray_actor_options.num_gpus"]
    with pytest.raises(ConfigError) as err:
        compose([*HUB, "+model.llm.engine_kwargs.tensor_parallel_size=2", "model.llm.deployment.placement=inline"])
    assert err.value.problems[0][0] == "model.llm.deployment.placement"


def test_a_share_of_a_gpu_must_hold_the_memory_vllm_is_told_it_may_use():
    share = [*HUB, "++model.llm.deployment.engine.ray_actor_options.num_gpus=0.5"]
    compose([*share, "+model.llm.engine_kwargs.gpu_memory_utilization=0.45"])
    with pytest.raises(ConfigError) as err:
        compose([*share, "+model.llm.engine_kwargs.gpu_memory_utilization=0.6"])
    (key, msg), = err.value.problems
    assert key == "model.llm.engine_kwargs.gpu_memory_utilization" and "0.5 of a GPU" in msg
    with pytest.raises(ConfigError) as err:
        compose(share)  # vLLM's own default would take 0.92 of the card
    assert "0.92" in err.value.problems[0][1]
    # two models, half a card each, on a one-GPU cluster: Ray packs them on it
    two = compose(["deployment=gpu", "model=[llm,embedder]", "model.llm.source=Qwen/Qwen3-0.6B",
                   "model.embedder.source=BAAI/bge-small-en-v1.5",
                   "++model.llm.deployment.engine.ray_actor_options.num_gpus=0.5",
                   "++model.embedder.deployment.engine.ray_actor_options.num_gpus=0.5",
                   "+model.llm.engine_kwargs.gpu_memory_utilization=0.45",
                   "+model.embedder.engine_kwargs.gpu_memory_utilization=0.4"])
    check_resources(two, cpus=4, gpus=1)


def test_the_launcher_refuses_more_gpus_than_the_machine_has_before_starting_anything():
    r = subprocess.run([sys.executable, "-m", "apps.launch", *HUB, "+model.llm.engine_kwargs.tensor_parallel_size=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stdout + r.stderr
    line, = [ln for ln in r.stderr.splitlines() if "num_gpus" in ln]
    assert "2 GPUs in total" in line and "the cluster has 0" in line
    assert "Started" not in r.stdout + r.stderr


def test_where_mmserve_places_the_engine_core_vllms_own_placement_options_are_refused():
    with pytest.raises(ConfigError) as err:
        compose([*HUB, "+model.llm.engine_kwargs.data_parallel_size=2"])
    (key, msg), = err.value.problems
    assert key == "model.llm.engine_kwargs.data_parallel_size" and "placement engine" in msg
