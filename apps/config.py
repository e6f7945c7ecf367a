"""From Hydra's composed config to a validated :class:`~core.config.AppConfig`, and the
launcher's secrets from the environment added to it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

from core.config import AppConfig, ServerConfig
from core.validate import ConfigError, validate_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def to_plain(cfg) -> dict:
    """A composed ``DictConfig`` as a resolved plain dict without its ``hydra`` section.

    Raises:
        ConfigError: an interpolation failed (named by its dotted key).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError([(getattr(err, "full_key", None) or "config", str(err).splitlines()[0])]) from None
    assert isinstance(raw, dict), "a composed config is a DictConfig, whose container is a dict"
    raw.pop("hydra", None)
    return raw


def to_app_config(cfg) -> AppConfig:
    """Validate a composed ``DictConfig``; raises ConfigError (interpolation errors included)."""
    return validate_config(to_plain(cfg))


def compose(overrides: list[str] | None = None, config_name: str = "config") -> AppConfig:
    """Compose ``conf/`` with Hydra overrides and validate it (for tests, benchmarks, tools)."""
    return validate_config(compose_plain(overrides, config_name))


def compose_plain(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """Compose ``conf/`` with Hydra overrides into the plain dict that validation takes (what
    an exported Serve config carries)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_plain(hydra_compose(config_name=config_name, overrides=overrides or []))


def with_env_api_keys(cfg: AppConfig, env: Mapping[str, str] = os.environ) -> AppConfig:
    """``cfg`` with the comma-separated keys of the variable ``server.api_keys_env`` (in
    ``env``) added to ``server.api_keys``, duplicates dropped. The launcher calls it after
    validation, so that the config validates the same in every shell; tests and sweeps,
    which call no authenticated route, leave it out."""
    server = env_api_keys(cfg.server, env)
    return cfg if server is cfg.server else cfg.model_copy(update={"server": server})


def env_api_keys(server: ServerConfig, env: Mapping[str, str] = os.environ) -> ServerConfig:
    """``server`` with the keys of ``server.api_keys_env`` added (see :func:`with_env_api_keys`)."""
    extra = env.get(server.api_keys_env or "", "")
    keys = list(dict.fromkeys([*server.api_keys, *(k.strip() for k in extra.split(",") if k.strip())]))
    return server if keys == server.api_keys else server.model_copy(update={"api_keys": keys})


def exit_on_config_error(err: ConfigError) -> None:
    """Print every problem of an invalid config and exit with status 2 (nothing was started)."""
    print(str(err), file=sys.stderr)
    raise SystemExit(2)
