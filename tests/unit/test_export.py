"""``python -m apps.export``: a Serve config file valid against Ray's own schema, whose builder
validates again with the launcher's messages and builds the launcher's graph; the RayService
beside it; and what ships to a cluster."""

from __future__ import annotations

import zipfile

import pytest
import yaml

from apps import export
from apps.builder import ingress_from_args, step_from_args
from apps.serving import EXCLUDES, PROJECT_ROOT, code_runtime_env
from core.config import ServerConfig
from core.validate import ConfigError

OVERRIDES = ["model=[echo,echo_remote]", "pipeline=[echo]", "server.port=8123"]


@pytest.fixture
def written(tmp_path):
    return export.export(OVERRIDES, tmp_path / "serve.yaml", working_dir="https://example.org/mmserve.zip")


def _init_args(application) -> dict:
    from ray.serve._private.build_app import build_app as serve_build

    built = serve_build(application, name="x")
    return {d.name: d.init_args for d in built.deployments}


def test_the_file_is_a_serve_config_whose_builders_build_the_launchers_applications(written):
    from ray.serve.schema import ServeDeploySchema

    from apps.builder import build_targets, ingress_config
    from apps.config import compose

    serve_yaml, _ = written
    config = yaml.safe_load(serve_yaml.read_text())
    schema = ServeDeploySchema.model_validate(config)
    step, ingress = schema.applications
    assert (step.name, step.route_prefix, step.import_path) == ("mmserve.echo-remote.engine", None,
                                                               "apps.builder:step_from_args")
    assert (ingress.name, ingress.route_prefix, ingress.import_path) == ("mmserve", "/",
                                                                        "apps.builder:ingress_from_args")
    assert step.runtime_env == ingress.runtime_env == {"working_dir": "https://example.org/mmserve.zip"}
    assert config["http_options"]["port"] == 8123

    cfg = compose(OVERRIDES)
    launched = {t.name: t for t in build_targets(cfg, "mmserve", "/")}
    assert launched.keys() == {"mmserve.echo-remote.engine", "mmserve"}
    assert (repr(_init_args(step_from_args(step.args)))
            == repr(_init_args(launched["mmserve.echo-remote.engine"].app)))
    assert repr(_init_args(ingress_from_args(ingress.args))) == repr(_init_args(launched["mmserve"].app))
    # the ingress's models are its deployment's user_config, as the launcher gives it
    (override,) = config["applications"][1]["deployments"]
    assert override == {"name": "ingress", "user_config": ingress_config(cfg)}
    assert [r["model"]["model_id"] for r in override["user_config"]["routes"]] == ["echo", "echo-remote"]


def test_another_set_of_models_changes_only_their_applications_and_the_ingress_user_config(tmp_path):
    """What ``serve deploy`` of the file exported again restarts: Serve rebuilds (and restarts)
    an application whose code version changed; here only the added model's is new."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    def apps(overrides, name):
        out, _ = export.export(overrides, tmp_path / name)
        return {a.name: a for a in ServeDeploySchema.model_validate(yaml.safe_load(out.read_text())).applications}

    before = apps(["model=[echo,echo_remote,tiny_resnet]", "pipeline=[echo,vision]"], "a.yaml")
    after = apps(["model=[echo_remote,echo_split]", "pipeline=[echo]"], "b.yaml")
    assert set(before) == {"mmserve", "mmserve.echo-remote.engine", "mmserve.tiny-resnet.engine"}
    assert set(after) == {"mmserve", "mmserve.echo-remote.engine", "mmserve.echo-split.preprocess",
                          "mmserve.echo-split.engine", "mmserve.echo-split.postprocess"}
    for kept in ("mmserve", "mmserve.echo-remote.engine"):
        assert get_app_code_version(before[kept]) == get_app_code_version(after[kept]), kept
    routes = [[r["model"]["model_id"] for r in a["mmserve"].deployments[0].user_config["routes"]]
              for a in (before, after)]
    assert routes == [["echo", "echo-remote", "tiny-resnet"], ["echo-remote", "echo-split"]]


def test_the_builders_refuse_an_invalid_config_with_the_launchers_messages(written):
    serve_yaml, _ = written
    step, ingress = (a["args"] for a in yaml.safe_load(serve_yaml.read_text())["applications"])
    step["config"]["server"]["port"] = "abc"
    step["config"]["model"]["echo_remote"]["bogus"] = 1
    with pytest.raises(ConfigError) as err:
        step_from_args(step)
    assert {key for key, _ in err.value.problems} == {"server.port", "model.echo_remote.bogus"}
    ingress["config"]["server"]["port"] = "abc"
    ingress["config"]["deployment"]["ingress"]["num_replicas"] = 0
    with pytest.raises(ConfigError) as err:
        ingress_from_args(ingress)
    assert {key for key, _ in err.value.problems} == {"server.port", "deployment.ingress.num_replicas"}
    with pytest.raises(ValueError, match="args: expected"):
        step_from_args({"cfg": {}})
    with pytest.raises(ValueError, match="args.step: 'preprocess' is not a step"):
        step_from_args({**step, "config": yaml.safe_load(serve_yaml.read_text())["applications"][0]["args"]["config"],
                        "step": "preprocess"})


def test_an_invalid_config_exits_2_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export.main(["server.port=abc", "--out", str(tmp_path / "serve.yaml")])
    assert exit_.value.code == 2 and "server.port" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_rayservice_carries_the_same_serve_config_and_servings_environment(written):
    serve_yaml, manifest = written
    service = yaml.safe_load(manifest.read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    spec = service["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == yaml.safe_load(serve_yaml.read_text())
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == export.RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in head["env"]}
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # server.http_proxy: haproxy, as the launcher sets it
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert {"containerPort": 8123, "name": "serve"} in head["ports"]


def test_what_ships_leaves_out_environments_caches_and_outputs(tmp_path):
    assert code_runtime_env(ServerConfig()) == {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}
    assert code_runtime_env(ServerConfig(ship_code=False)) == {}
    names = zipfile.ZipFile(export.package(tmp_path / "p.zip")).namelist()
    assert "mmserve/apps/builder.py" in names and "mmserve/conf/config.yaml" in names
    assert all(n.startswith("mmserve/") for n in names)
    for left_out in (".venv/", ".git/", "__pycache__/", "outputs/", "multirun/", ".hypothesis/"):
        assert not any(f"/{left_out}" in n for n in names), left_out


def _actor_env(application) -> dict:
    from ray.serve._private.build_app import build_app as serve_build

    (deployment,) = serve_build(application, name="x").deployments
    return (deployment.ray_actor_options or {}).get("runtime_env", {}).get("env_vars", {})


def test_a_steps_replicas_stop_without_the_http_ingress_drain_unless_the_config_sets_one():
    from apps.builder import DRAIN_ENV, build_targets
    from apps.config import compose

    targets = {t.name: t for t in build_targets(compose(OVERRIDES), "mmserve", "/")}
    assert _actor_env(targets["mmserve.echo-remote.engine"].app)[DRAIN_ENV] == "0"
    assert DRAIN_ENV not in _actor_env(targets["mmserve"].app)  # the server's serve_env holds
    own = compose([*OVERRIDES, f"++model.echo_remote.deployment.engine.ray_actor_options.env_vars.{DRAIN_ENV}=3"])
    (step, _) = build_targets(own, "mmserve", "/")
    assert _actor_env(step.app)[DRAIN_ENV] == "3"
