"""``python -m apps.launch [hydra overrides]``: validate, show, deploy and serve the config.

Exits 2 on an invalid config (nothing started), 1 if deployment fails, 0 after Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from apps.config import CONF_DIR, exit_on_config_error, to_app_config
from core.validate import ConfigError

logger = logging.getLogger("mmserve.launch")


def serve_config(cfg) -> None:
    """Deploy a validated config and serve until SIGINT/SIGTERM."""
    from rich.console import Console

    from apps import serving
    from apps.graph import graph_table

    Console().print(graph_table(cfg))
    serving.install_signal_handlers()
    try:
        serving.connect_ray(cfg)
    except ConfigError as err:
        exit_on_config_error(err)
    except serving.ShutdownRequested:
        return
    try:
        serving.deploy(cfg)
        url = f"http://{cfg.server.host}:{cfg.server.port}{cfg.server.route_prefix}"
        logger.info("ready: %d model(s) served at %s (POST %sv1/infer); Ctrl-C to stop",
                    len(cfg.model), url, url.rstrip("/") + "/")
        serving.wait_forever()
    except serving.ShutdownRequested as sig:
        logger.info("%s received: shutting down", sig)
    finally:
        serving.shutdown(cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_app_config(dcfg)
    except ConfigError as err:
        exit_on_config_error(err)
    serve_config(cfg)


if __name__ == "__main__":
    main()
