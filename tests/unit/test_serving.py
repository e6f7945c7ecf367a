"""The environment Serve's processes start with, per ``server.http_proxy``, and the launcher's
secrets from the environment (no Ray started)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from apps.config import compose, with_env_api_keys
from apps.serving import HAPROXY_MODE_ENV, HAPROXY_PORTS, RaySession, environ, free_port, serve_env
from core.config import ServerConfig
from core.validate import ConfigError

def _yaml(path: str) -> dict:
    import yaml

    from apps.config import CONF_DIR

    return yaml.safe_load((Path(CONF_DIR) / path).read_text())


#: what the default host profile (conf/host/small_cpu.yaml) tunes: read from the file, not copied
SMALL_CPU = {k: str(v) for k, v in _yaml("host/small_cpu.yaml")["serve_env"].items()}


def test_the_config_shows_the_serve_env_it_applies():
    server = compose().server
    assert {k: v for k, v in serve_env(server, local=False).items() if k not in HAPROXY_MODE_ENV} == server.serve_env
    assert set(SMALL_CPU) <= set(server.serve_env)


def test_the_host_profile_holds_the_tuning_and_ray_defaults_leave_it_out():
    """`host=small_cpu` (the default) adds its Ray knobs and confines a local Ray's processes
    (`ray_cpus: auto`); `host=ray_defaults` leaves every one at Ray's value and Ray on every
    CPU, while what is not host tuning (server/default.yaml's own serve_env) stays."""
    tuned, plain = compose().server, compose(["host=ray_defaults"]).server
    assert SMALL_CPU and {k: tuned.serve_env[k] for k in SMALL_CPU} == SMALL_CPU
    assert not set(SMALL_CPU) & set(plain.serve_env)
    assert plain.serve_env == {k: v for k, v in tuned.serve_env.items() if k not in SMALL_CPU}
    assert plain.serve_env, "server/default.yaml's own settings stay"
    assert (tuned.ray_cpus, plain.ray_cpus) == ("auto", "all")
    assert (tuned.slow_starts_at_once, plain.slow_starts_at_once) == (2, None)


def test_haproxy_is_the_default_mode_and_a_local_ray_gets_free_ports():
    server = compose().server
    assert server.http_proxy == "haproxy"
    env = serve_env(server, local=True)
    assert {k: env[k] for k in HAPROXY_MODE_ENV} == HAPROXY_MODE_ENV
    ports = [int(env[k]) for k in HAPROXY_PORTS]
    assert len(set(ports)) == len(ports) and all(p > 0 for p in ports)
    # on a cluster the ports are the cluster's business
    assert not set(HAPROXY_PORTS) & set(serve_env(server, local=False))


def test_free_ports_come_from_below_the_ephemeral_range_and_are_bindable():
    from apps.serving import EPHEMERAL_RANGE, FREE_PORTS

    below = int(EPHEMERAL_RANGE.read_text().split()[0])
    for _ in range(20):
        port = free_port()
        assert port in FREE_PORTS and port < below  # an outgoing connection cannot take it
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_handed_out(monkeypatch, tmp_path):
    from apps import serving

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the only candidate below the "ephemeral range" is the taken port
        (tmp_path / "range").write_text(f"{port + 1}\t60999\n")
        monkeypatch.setattr(serving, "FREE_PORTS", range(port, port + 10))
        monkeypatch.setattr(serving, "EPHEMERAL_RANGE", tmp_path / "range")
        assert free_port() != port  # the kernel's pick instead


def test_haproxy_ports_avoid_the_server_port_and_each_other(monkeypatch):
    # server.port is not bound until HAProxy starts, so free_port() alone may hand it out: CI
    # saw the fallback proxy take it and HAProxy fail to bind it. In a range of 4 ports with
    # server.port among them, a pick that ignored it would take it 3 times in 4.
    from apps import serving

    start = free_port()
    monkeypatch.setattr(serving, "FREE_PORTS", range(start, start + 4))
    for _ in range(10):
        server = compose([f"server.port={start + 1}"]).server
        env = serve_env(server, local=True)
        ports = {int(env[k]) for k in HAPROXY_PORTS}
        assert len(ports) == 3 and start + 1 not in ports, env


def test_ports_already_in_the_environment_or_the_config_are_kept(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in serve_env(compose().server, local=True)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_STATS_PORT")
    server = compose(["++server.serve_env.RAY_SERVE_HAPROXY_STATS_PORT=18405"]).server
    assert serve_env(server, local=True)["RAY_SERVE_HAPROXY_STATS_PORT"] == "18405"


def test_ray_proxy_mode_sets_only_serve_env_and_serve_env_overrides():
    server = compose(["server.http_proxy=ray"]).server
    assert serve_env(server, local=True) == server.serve_env
    server = compose(["++server.serve_env.RAY_SERVE_USE_GRPC_BY_DEFAULT=1",
                      "++server.serve_env.RAY_SERVE_ENABLE_HA_PROXY=0"]).server
    env = serve_env(server, local=False)
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == SMALL_CPU["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]


def test_unknown_mode_fails_validation_naming_the_key():
    with pytest.raises(ConfigError, match="server.http_proxy"):
        compose(["server.http_proxy=nginx"])


def test_api_keys_from_the_environment_are_added_by_the_launcher_not_by_validation(monkeypatch):
    monkeypatch.setenv("MY_KEYS", "e1, k1,e2,")
    cfg = compose(["model=[echo]", "server.api_keys=[k1]", "server.api_keys_env=MY_KEYS"])
    assert cfg.server.api_keys == ["k1"]  # the same config in every shell
    served = with_env_api_keys(cfg)
    assert served.server.api_keys == ["k1", "e1", "e2"] and cfg.server.api_keys == ["k1"]
    assert "e1" not in repr(served.server) and "k1" not in repr(served.server)
    assert with_env_api_keys(cfg, env={}).server.api_keys == ["k1"]
    assert ServerConfig(api_keys_env="MY_KEYS").api_keys == []


def test_the_base_url_names_a_reachable_host_and_the_prefix():
    session = RaySession(server=ServerConfig(host="0.0.0.0", port=8123), started=True, handles_signals=False)
    assert session.url() == "http://127.0.0.1:8123"
    assert session.url("/job3/") == "http://127.0.0.1:8123/job3"


def test_environ_restores_what_it_changed(monkeypatch):
    monkeypatch.setenv("MMSERVE_TEST_KEPT", "before")
    monkeypatch.delenv("MMSERVE_TEST_NEW", raising=False)
    with environ({"MMSERVE_TEST_KEPT": "during", "MMSERVE_TEST_NEW": "x"}):
        assert os.environ["MMSERVE_TEST_KEPT"] == "during" and os.environ["MMSERVE_TEST_NEW"] == "x"
    assert os.environ["MMSERVE_TEST_KEPT"] == "before" and "MMSERVE_TEST_NEW" not in os.environ
