"""``python -m apps.launch [hydra overrides]``: validate, show, deploy and serve the config.

Exits 2 on an invalid config (nothing started), 1 if deployment fails, 0 after Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from apps.config import CONF_DIR, exit_on_config_error, to_app_config, with_env_api_keys
from core.config import AppConfig
from core.validate import ConfigError

logger = logging.getLogger("mmserve.launch")


def serve_config(cfg: AppConfig) -> None:
    """Serve a validated config until SIGINT/SIGTERM, then drain and stop."""
    from rich.console import Console

    from apps import serving
    from apps.graph import graph_table

    Console().print(graph_table(cfg))
    try:
        with serving.served(cfg, handle_signals=True) as server:
            logger.info("ready: %d model(s) served at %s/ (POST %s/v1/infer); Ctrl-C to stop",
                        len(cfg.model), server.url, server.url)
            try:
                serving.wait_forever()
            except serving.ShutdownRequested as sig:
                logger.info("%s received: shutting down", sig)
    except ConfigError as err:  # more than the cluster has: nothing left running
        exit_on_config_error(err)
    except serving.ShutdownRequested as sig:
        logger.info("%s received while starting: stopped", sig)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_app_config(dcfg)
    except ConfigError as err:
        exit_on_config_error(err)
    serve_config(with_env_api_keys(cfg))


if __name__ == "__main__":
    main()
