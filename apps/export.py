"""``python -m apps.export [hydra overrides] [--out serve.yaml]``: the composed, validated config
as a Ray Serve config file, and a KubeRay ``RayService`` manifest beside it.

``serve deploy serve.yaml`` on any Ray cluster then serves what ``python -m apps.launch`` with
the same overrides would: the file's applications (see :func:`serve_config`) import
``apps.builder``'s ``ingress_from_args`` and ``step_from_args``, which validate the config they
carry again, with the launcher's messages, and build the same deployments. Exported again with
other models and deployed again, it updates the running applications in place. The project's code must be on the cluster: in its image, or as a zip at a remote URI
(``--working-dir``; ``--package`` writes that zip).

Exits 2 on an invalid config, like the launcher; writes nothing then.
"""

from __future__ import annotations

import argparse
import math
import sys
import zipfile
from pathlib import Path
from typing import Any

from apps.serving import EXCLUDES, PROJECT_ROOT
from core.config import AppConfig
from pipelines.deployments import step_app_name
from core.validate import ConfigError, resource_demands

#: the builders Serve imports from the exported file
INGRESS_IMPORT_PATH = "apps.builder:ingress_from_args"
STEP_IMPORT_PATH = "apps.builder:step_from_args"
RAY_VERSION = "2.60.0"


def serve_config(raw: dict[str, Any], cfg: AppConfig, working_dir: str | None = None) -> dict[str, Any]:
    """A Ray Serve config (``ray.serve.schema.ServeDeploySchema``) for the composed config
    ``raw`` (validated as ``cfg``): one application per model step that runs in a deployment of
    its own, whose ``args`` hold that one model, and the ingress's, whose ``args`` hold the
    ``server`` and ``deployment`` sections and whose models are the ``user_config`` of its
    deployment. ``serve deploy`` of the file changed so (a model added, removed or changed,
    replicas or limits changed) then changes only what changed: Serve restarts an application
    whose ``args`` changed, and applies a changed ``user_config`` to running replicas."""
    from apps.builder import ingress_config, route_specs

    runtime_env = {"working_dir": working_dir} if working_dir else None
    shared: dict[str, Any] = {k: raw[k] for k in ("server", "deployment") if k in raw}
    apps: list[dict[str, Any]] = []
    for key, spec in zip(cfg.model, route_specs(cfg)):  # route_specs keeps the config's order
        one = {**shared, "pipeline": {spec.model.pipeline: raw["pipeline"][spec.model.pipeline]},
               "model": {key: raw["model"][key]}}
        for step in spec.remote_steps:
            apps.append({"name": step_app_name(cfg.server.app_name, spec.model.model_id, step),
                         "route_prefix": None, "import_path": STEP_IMPORT_PATH,
                         "args": {"config": one, "model": key, "step": step}})
    apps.append({"name": cfg.server.app_name, "route_prefix": cfg.server.route_prefix,
                 "import_path": INGRESS_IMPORT_PATH, "args": {"config": shared},
                 "deployments": [{"name": "ingress", "user_config": ingress_config(cfg)}]})
    if runtime_env:
        for app in apps:
            app["runtime_env"] = runtime_env
    return {"proxy_location": cfg.server.proxy_location,
            "http_options": {"host": cfg.server.host, "port": cfg.server.port},
            "applications": apps}


def check_schema(config: dict[str, Any]) -> None:
    """Raise ValueError unless ``config`` is a valid Serve config file."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


def ray_service(serve_yaml: str, cfg: AppConfig, image: str, name: str) -> dict[str, Any]:
    """A KubeRay ``RayService`` serving ``serve_yaml``: a head pod (Serve's controller, no
    replicas) and one worker group sized for the config's deployments, every container with the
    Serve environment the launcher would give a local Ray (``server.serve_env``)."""
    from apps.serving import serve_env

    env = [{"name": k, "value": v} for k, v in sorted(serve_env(cfg.server, local=False).items())]
    demands = resource_demands(cfg)
    cpus = max(1, math.ceil(sum(d.cpus for d in demands)) + 1)  # +1: the HTTP side and Ray itself
    gpus = math.ceil(sum(d.gpus for d in demands))
    limits: dict[str, str] = {"cpu": str(cpus), "memory": f"{max(4, 2 * cpus)}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)

    def container(role: str, resources: dict[str, str]) -> dict[str, Any]:
        ports = [{"containerPort": 8265, "name": "dashboard"}, {"containerPort": 6379, "name": "gcs"},
                 {"containerPort": cfg.server.port, "name": "serve"}] if role == "head" else []
        spec = {"name": f"ray-{role}", "image": image, "env": env,
                "resources": {"limits": resources, "requests": resources}}
        if ports:
            spec["ports"] = ports
        return spec

    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": name},
            "spec": {"serveConfigV2": serve_yaml, "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                                  "template": {"spec": {"containers": [container("head", {"cpu": "2", "memory": "4Gi"})]}}},
                "workerGroupSpecs": [{"groupName": "models", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                                      "rayStartParams": {},
                                      "template": {"spec": {"containers": [container("worker", limits)]}}}]}}}


def package(path: Path) -> Path:
    """Zip the project (without :data:`EXCLUDES`) under one top-level folder, as Ray expects
    of a ``working_dir`` at a remote URI."""
    import fnmatch

    def excluded(rel: Path) -> bool:
        return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in EXCLUDES
                   if "/" not in pat) or any(fnmatch.fnmatch(str(rel), pat) for pat in EXCLUDES)

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(PROJECT_ROOT.rglob("*")):
            rel = file.relative_to(PROJECT_ROOT)
            if file.is_file() and not excluded(rel) and file.resolve() != path.resolve():
                zf.write(file, Path("mmserve") / rel)
    return path


def _dump(data: Any) -> str:
    """YAML, with multi-line strings (the RayService's serveConfigV2) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=100)


def export(overrides: list[str], out: Path, working_dir: str | None = None,
           image: str = "mmserve:latest") -> tuple[Path, Path]:
    """Write ``out`` (the Serve config) and ``<out stem>.rayservice.yaml``; returns both paths.

    Raises:
        ConfigError: the config is invalid (nothing written).
    """
    from apps.config import compose_plain
    from core.validate import validate_config

    raw = compose_plain(overrides)
    cfg = validate_config(raw)
    config = serve_config(raw, cfg, working_dir)
    check_schema(config)
    header = (f"# Ray Serve config written by `python -m apps.export {' '.join(overrides)}`.\n"
              f"# Deploy: serve deploy {out.name} (Serve's own settings, such as server.serve_env's\n"
              "# RAY_SERVE_* variables, are the cluster's environment: see the RayService beside it).\n")
    text = _dump(config)
    out.write_text(header + text)
    manifest = out.with_name(f"{out.stem}.rayservice.yaml")
    manifest.write_text("# KubeRay RayService written by `python -m apps.export`: build `image` from this repo\n"
                        + _dump(ray_service(text, cfg, image, cfg.server.app_name.lower().replace("_", "-"))))
    return out, manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m apps.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as the launcher takes them")
    ap.add_argument("--out", type=Path, default=Path("serve.yaml"), help="the Serve config to write")
    ap.add_argument("--working-dir", help="remote URI of the project's zip (https://, s3://, gs://, "
                    "file://); without it the cluster's image must hold the project")
    ap.add_argument("--package", type=Path, help="also write the project's zip here, for --working-dir")
    ap.add_argument("--image", default="mmserve:latest", help="container image of the RayService")
    args = ap.parse_args(argv)
    try:
        written: tuple[Path, ...] = export(args.overrides, args.out, args.working_dir, args.image)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(2) from None
    if args.package:
        written += (package(args.package),)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
