"""``python -m apps.export``: a Serve config file valid against Ray's own schema, whose builder
validates again with the launcher's messages and builds the launcher's graph; the RayService
beside it; and what ships to a cluster."""

from __future__ import annotations

import zipfile

import pytest
import yaml

from apps import export
from apps.builder import from_args
from apps.serving import EXCLUDES, PROJECT_ROOT, code_runtime_env
from core.config import ServerConfig
from core.validate import ConfigError

OVERRIDES = ["model=[echo,echo_remote]", "pipeline=[echo]", "server.port=8123"]


@pytest.fixture
def written(tmp_path):
    return export.export(OVERRIDES, tmp_path / "serve.yaml", working_dir="https://example.org/mmserve.zip")


def test_the_file_is_a_serve_config_whose_builder_builds_the_launchers_graph(written):
    from ray.serve.schema import ServeDeploySchema

    from apps.builder import build_app
    from apps.config import compose

    serve_yaml, _ = written
    config = yaml.safe_load(serve_yaml.read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "apps.builder:from_args" and app.route_prefix == "/"
    assert app.runtime_env == {"working_dir": "https://example.org/mmserve.zip"}
    assert config["http_options"]["port"] == 8123

    def deployments(application) -> dict:
        from ray.serve._private.build_app import build_app as serve_build

        built = serve_build(application, name="x")
        return {d.name: d.init_args for d in built.deployments}

    exported, launched = deployments(from_args(app.args)), deployments(build_app(compose(OVERRIDES)))
    assert exported.keys() == launched.keys() == {"ingress", "echo-remote.engine"}
    assert repr(exported["echo-remote.engine"]) == repr(launched["echo-remote.engine"])


def test_the_builder_refuses_an_invalid_config_with_the_launchers_messages(written):
    serve_yaml, _ = written
    args = yaml.safe_load(serve_yaml.read_text())["applications"][0]["args"]
    args["config"]["server"]["port"] = "abc"
    args["config"]["model"]["echo"]["bogus"] = 1
    with pytest.raises(ConfigError) as err:
        from_args(args)
    assert {key for key, _ in err.value.problems} == {"server.port", "model.echo.bogus"}
    with pytest.raises(ValueError, match="args: expected"):
        from_args({"cfg": {}})


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
