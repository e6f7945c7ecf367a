"""The environment Serve's processes start with, per ``server.http_proxy`` (no Ray started)."""

from __future__ import annotations

import os

import pytest

from apps.config import compose
from apps.serving import CONTROL_PLANE_ENV, HAPROXY_ENV, HAPROXY_PORTS, environ, serve_env
from core.validate import ConfigError


def test_haproxy_is_the_default_mode_and_a_local_ray_gets_free_ports():
    server = compose().server
    assert server.http_proxy == "haproxy"
    env = serve_env(server, local=True)
    assert {k: env[k] for k in HAPROXY_ENV} == HAPROXY_ENV
    ports = [int(env[k]) for k in HAPROXY_PORTS]
    assert len(set(ports)) == len(ports) and all(p > 0 for p in ports)
    # on a cluster the ports are the cluster's business
    assert not set(HAPROXY_PORTS) & set(serve_env(server, local=False))


def test_ports_already_in_the_environment_are_kept(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in serve_env(compose().server, local=True)


def test_ray_proxy_mode_sets_only_the_control_plane_and_serve_env_overrides():
    assert serve_env(compose(["server.http_proxy=ray"]).server, local=True) == CONTROL_PLANE_ENV
    server = compose(["++server.serve_env.RAY_SERVE_USE_GRPC_BY_DEFAULT=1",
                      "++server.serve_env.RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1"]).server
    env = serve_env(server, local=False)
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1" and env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == CONTROL_PLANE_ENV["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]


def test_unknown_mode_fails_validation_naming_the_key():
    with pytest.raises(ConfigError, match="server.http_proxy"):
        compose(["server.http_proxy=nginx"])


def test_environ_restores_what_it_changed(monkeypatch):
    monkeypatch.setenv("MMSERVE_TEST_KEPT", "before")
    monkeypatch.delenv("MMSERVE_TEST_NEW", raising=False)
    with environ({"MMSERVE_TEST_KEPT": "during", "MMSERVE_TEST_NEW": "x"}):
        assert os.environ["MMSERVE_TEST_KEPT"] == "during" and os.environ["MMSERVE_TEST_NEW"] == "x"
    assert os.environ["MMSERVE_TEST_KEPT"] == "before" and "MMSERVE_TEST_NEW" not in os.environ
