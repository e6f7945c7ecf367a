"""The hook through which an engine declares how it is hosted (``Engine.hosting`` ->
``engines.base.Hosting``): validation, the resource count, placement and the ingress read it,
so a backend is one class and a registry line. The engines here are registered by a test
alone (``core.registry.ENGINES``); nothing in ``core/`` knows them."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from core import registry
from core.validate import ConfigError, resource_demands, validate_config
from engines.base import Engine, Hosting
from engines.echo import EchoEngine
from pipelines.deployments import REMOTE_STEPS
from tests.support import local_pipeline


class CoreEngine(EchoEngine):
    """An engine whose compute core runs in two actors beside its frontend."""

    @classmethod
    def hosting(cls, model) -> Hosting:
        return Hosting(routes=frozenset({"completion"}), core_actors=2, binds_cores=True)


class TokenKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    max_model_len: int | None = 128


class TokenEngine(EchoEngine):
    """An engine that takes token ids: its options are what a tokenizing node reads."""

    Kwargs = TokenKwargs


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(registry.ENGINES, "core_engine", f"{__name__}:CoreEngine")
    monkeypatch.setitem(registry.ENGINES, "token_engine", f"{__name__}:TokenEngine")


def raw(name: str = "echo", preprocess: str = "identity", ingress_replicas: int = 1, **deployment) -> dict:
    """A config of one model ``m`` on engine ``name``, with ``deployment`` as its own block."""
    return {"deployment": {"ingress": {"num_replicas": ingress_replicas}},
            "pipeline": {"p": {"preprocess": {"name": preprocess}, "engine": "echo",
                               "postprocess": {"name": "result"}}},
            "model": {"m": {"model_id": "m", "modality": "text", "pipeline": "p", "engine": name,
                            "deployment": deployment}}}


def problems(config: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    return dict(e.value.problems)


def test_the_base_engine_declares_nothing():
    hosting = Engine.hosting(None)
    assert hosting == Hosting() and not hosting.core and not hosting.routes and not hosting.binds_cores


def test_remote_core_is_refused_for_an_engine_without_a_core():
    msg = problems(raw(placement="remote_core"))["model.m.deployment.placement"]
    assert msg.startswith("remote_core: engine 'echo' declares no core") and "use engine" in msg


def test_an_engine_registered_with_a_core_may_take_remote_core():
    cfg = validate_config(raw("core_engine", placement="remote_core"))
    assert cfg.model["m"].deployment.placement == "remote_core"
    assert REMOTE_STEPS["remote_core"] == ()  # its steps stay in the ingress replica


def test_remote_core_takes_one_engine_replica():
    msg = problems(raw("core_engine", placement="remote_core", engine={"num_replicas": 2}))
    assert "for replicas of the engine use placement engine" in msg["model.m.deployment.engine.num_replicas"]


def test_the_resource_demands_count_the_core_actors_the_hosting_declares():
    cfg = validate_config(raw("core_engine", ingress_replicas=3, placement="remote_core",
                              engine={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}))
    engine = next(d for d in resource_demands(cfg) if d.key == "model.m.deployment.engine")
    assert (engine.replicas, engine.cpus, engine.gpus) == (6, 3.0, 6.0)  # 2 actors x 3 ingress replicas
    # the same engine on placement engine: one deployment of its own, its replicas alone
    cfg = validate_config(raw("core_engine", placement="engine", engine={"ray_actor_options": {"num_gpus": 1}}))
    engine = next(d for d in resource_demands(cfg) if d.key == "model.m.deployment.engine")
    assert (engine.replicas, engine.gpus) == (1, 1.0)


def test_the_routes_a_pipeline_answers_are_its_engines_hosting():
    cfg = validate_config(raw("core_engine"))
    assert local_pipeline(cfg.model["m"], CoreEngine).openai_routes == {"completion"}
    assert local_pipeline(validate_config(raw()).model["m"]).openai_routes == frozenset()


def test_a_local_ray_keeps_off_the_cores_of_an_engine_whose_hosting_binds_them(monkeypatch):
    from apps import serving
    from core.config import ServerConfig

    monkeypatch.setattr(serving.cpus, "allowed", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(serving, "local_gpu_count", lambda: 0)
    assert serving.local_ray_cpus(ServerConfig(), validate_config(raw("core_engine"))) == {3}
    assert serving.local_ray_cpus(ServerConfig(), validate_config(raw())) is None


def test_a_tokenizing_node_needs_an_engine_whose_options_it_reads():
    msg = problems(raw("echo", preprocess="text_prompt"))["model.m.engine"]
    assert msg == ("engine 'echo' has no options that the preprocess node 'text_prompt' reads "
                   "(tokenizer, revision, trust_remote_code, max_model_len)")
    cfg = validate_config(raw("token_engine", preprocess="text_prompt"))
    node = registry.node_class("text_prompt")({}, cfg.model["m"])
    assert node.max_model_len == 128 and node.options.trust_remote_code is False


def test_engine_options_of_names_what_an_engine_lacks():
    from core.protocol import MediaChatOptions

    model = validate_config(raw()).model["m"]
    with pytest.raises(TypeError, match="engine 'echo' has no options MediaChatOptions names"):
        registry.engine_options_of(model, MediaChatOptions)
