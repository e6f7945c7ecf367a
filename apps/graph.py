"""The resolved serving graph as a Rich table: models, nodes, placement, replicas, resources."""

from __future__ import annotations

from core.config import AppConfig, DeploymentOptions


def _replicas(opts: DeploymentOptions) -> str:
    a = opts.autoscaling_config
    return f"{a.min_replicas}-{a.max_replicas} (auto)" if a else str(opts.num_replicas)


def _resources(opts: DeploymentOptions) -> str:
    r = opts.ray_actor_options
    parts = [f"{r.num_cpus:g} CPU"] + ([f"{r.num_gpus:g} GPU"] if r.num_gpus else [])
    return ", ".join(parts) + f"; {opts.max_ongoing_requests} ongoing"


def graph_table(cfg: AppConfig):
    """A ``rich.table.Table`` with one row per deployment the config creates."""
    from rich.table import Table

    table = Table(title=f"mmserve: app {cfg.server.app_name!r} on "
                        f"http://{cfg.server.host}:{cfg.server.port}{cfg.server.route_prefix}")
    # fold, not cut: a console narrower than the table (a pipe, a log file: 80 columns) wraps
    # long cells onto more lines rather than ending them in "…"
    for col in ("model", "pipeline", "node", "runs in", "replicas", "resources per replica"):
        table.add_column(col, overflow="fold")
    ing = cfg.deployment.ingress
    table.add_row("*", "", "ingress + router", "ingress", _replicas(ing), _resources(ing))
    for model in cfg.model.values():
        pipe = cfg.pipeline[model.pipeline]
        dep = model.deployment
        steps = [("preprocess: " + pipe.preprocess.name, "split", dep.node),
                 ("engine: " + (model.engine or pipe.engine), "engine", dep.engine),
                 ("postprocess: " + pipe.postprocess.name, "split", dep.node)]
        for i, (label, own_from, opts) in enumerate(steps):
            own = dep.placement == "split" or (dep.placement == own_from)
            core = own_from == "engine" and dep.placement == "remote_core"
            where = "own deployment" if own else "ingress + core actor" if core else "ingress"
            table.add_row(model.model_id if i == 0 else "", model.pipeline if i == 0 else "", label, where,
                          _replicas(opts) if own or core else "", _resources(opts) if own or core else "")
    return table
