"""``python -m apps.launch [hydra overrides]``: validate, show, deploy and serve the config.

``python -m apps.launch --update [hydra overrides]``: have the launcher already serving
``server.app_name`` (on this machine's Ray, or ``RAY_ADDRESS``'s) serve this config instead,
in place (see ``apps.updates``): added models start, removed ones finish their requests and go,
the others keep running.

While models start, a live table shows each one's state; each model takes requests once it is
ready (``/health`` and ``/v1/models`` answer from the first seconds). Ray's, the engines' and the
replicas' output goes to Ray's log files, whose directory is printed.

Exits 2 on an invalid config (nothing started or sent), 1 if deployment (or the update) fails or
a model failed to start (with ``server.on_start_failure: serve_others`` once the others have been
served until Ctrl-C), 0 after Ctrl-C/SIGTERM (or once the update is applied).
"""

from __future__ import annotations

import contextlib
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
    from apps.progress import StartupTable

    quiet_serve_driver()
    console = Console()
    console.print(graph_table(cfg))
    failed: dict[str, str] = {}
    try:
        serving.fetch_weights(cfg)
        table = StartupTable(cfg, console)
        table.start()
        with contextlib.ExitStack() as stack:
            stack.callback(table.stop)
            server = stack.enter_context(serving.served(cfg, handle_signals=True, log_to_driver=False,
                                                        progress=table))
            table.stop()
            report_start(console, cfg, server)
            failed = server.failed
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
    if failed:
        raise SystemExit(1)


def quiet_serve_driver() -> None:
    """Serve's INFO lines in this process ("Started Serve", "Connecting to existing Serve app",
    "Deleting app" for each application) say nothing the table does not, nor does its warning
    that the ingress, busy starting models, took over 0.1 s to tell its queue's length to the
    launcher's calls; its other warnings stay."""
    import ray.serve  # noqa: F401  (it sets its logger's level as it is imported)

    serve_logger = logging.getLogger("ray.serve")
    serve_logger.setLevel(logging.WARNING)
    serve_logger.addFilter(lambda record: not record.getMessage().startswith("Failed to get queue length"))


def engine_advice(cfg: AppConfig) -> list[tuple[str, str]]:
    """The known warnings of the config's engines (``Engine.log_advice``), each engine once."""
    from core.registry import engine_of

    engines = {engine_of(m) for m in cfg.model.values()}
    return [pair for e in sorted(engines, key=lambda e: e.__name__) for pair in e.log_advice]


def report_start(console, cfg: AppConfig, server) -> None:
    """Where the server is, the models that failed to start, where the logs are, a call to try."""
    from apps import log_advice
    from apps.progress import first_call
    from core import internals

    ready = {m.model_id for m in cfg.model.values()} - set(server.failed)
    for model_id, why in server.failed.items():
        console.print(f"[bold red]model {model_id} failed to start[/]: {why}", soft_wrap=True)
    console.print(f"[green]{len(ready)} of {len(cfg.model)} model(s) served at {server.url}/[/]"
                  f" (POST /v1/infer, the OpenAI routes under /v1, GET /v1/models); Ctrl-C to stop",
                  soft_wrap=True)
    if logs := internals.ray_logs_dir():
        console.print(f"Ray's, the engines' and the replicas' logs: {logs}", soft_wrap=True, highlight=False)
        for line in log_advice.advice(logs, engine_advice(cfg)):
            console.print(f"[yellow]warning[/]: {line}", soft_wrap=True, highlight=False)
    if call := first_call(cfg, server.url, ready):
        console.print(f"try: {call}", soft_wrap=True, highlight=False)


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
