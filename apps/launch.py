"""``python -m apps.launch [hydra overrides]``: validate, show, deploy and serve the config.

``python -m apps.launch --update [hydra overrides]``: have the launcher already serving
``server.app_name`` (on this machine's Ray, or ``RAY_ADDRESS``'s) serve this config instead,
in place (see ``apps.updates``): added models start, removed ones finish their requests and go,
the others keep running.

Exits 2 on an invalid config (nothing started or sent), 1 if deployment (or the update) fails,
0 after Ctrl-C/SIGTERM (or once the update is applied).
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from apps.config import CONF_DIR, exit_on_config_error, to_plain, with_env_api_keys
from core.config import AppConfig
from core.validate import ConfigError, validate_config

logger = logging.getLogger("mmserve.launch")

UPDATE_FLAG = "--update"


def serve_config(cfg: AppConfig) -> None:
    """Serve a validated config until SIGINT/SIGTERM, then drain and stop; meanwhile apply the
    configs that ``--update`` sends."""
    from rich.console import Console

    from apps import serving, updates
    from apps.graph import graph_table

    Console().print(graph_table(cfg))
    try:
        serving.fetch_weights(cfg)
        with serving.served(cfg, handle_signals=True) as server:
            current = [cfg]

            def apply(raw: dict) -> dict:
                try:
                    new = with_env_api_keys(validate_config(raw))
                    changes = server.session.update(current[0], new, app_name=server.app_name,
                                                    route_prefix=cfg.server.route_prefix)
                except ConfigError as err:
                    return {"ok": False, "error": str(err)}
                current[0] = new
                Console().print(graph_table(new))
                logger.info("updated in place: %s", json.dumps(changes))
                return {"ok": True, **changes, "served": sorted(m.model_id for m in new.model.values())}

            close = updates.open_channel(server.app_name, apply)
            logger.info("ready: %d model(s) served at %s/ (POST %s/v1/infer); Ctrl-C to stop",
                        len(cfg.model), server.url, server.url)
            try:
                serving.wait_forever()
            except serving.ShutdownRequested as sig:
                logger.info("%s received: shutting down", sig)
            finally:
                close()
    except ConfigError as err:  # more than the cluster has: nothing left running
        exit_on_config_error(err)
    except serving.ShutdownRequested as sig:
        logger.info("%s received while starting: stopped", sig)


def send_update(raw: dict, cfg: AppConfig) -> None:
    """Send the validated config to the running launcher; print its answer."""
    from apps import updates

    try:
        answer = updates.send(cfg.server.app_name, raw, cfg.server.ready_timeout_s + 60)
    except RuntimeError as err:
        print(f"update failed: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(answer))
    if not answer.get("ok"):
        raise SystemExit(1)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        raw = to_plain(dcfg)
        cfg = validate_config(raw)
    except ConfigError as err:
        exit_on_config_error(err)
    if UPDATING:
        send_update(raw, cfg)
    else:
        serve_config(with_env_api_keys(cfg))


UPDATING = False

if __name__ == "__main__":
    if UPDATE_FLAG in sys.argv[1:]:
        sys.argv.remove(UPDATE_FLAG)
        UPDATING = True
    main()
