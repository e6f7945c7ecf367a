"""Integration fixtures: one Ray Serve instance per test module, on a free port."""

from __future__ import annotations

import pytest

from apps.serving import free_port


@pytest.fixture(scope="module")
def serve_app(request):
    """Deploy ``request.module.OVERRIDES`` (Hydra overrides) and yield its base URL."""
    import ray
    from ray import serve

    from apps.config import compose
    from apps.serving import init_local_ray
    from pipelines.builder import build_app

    port = free_port()
    cfg = compose([*request.module.OVERRIDES, f"server.port={port}"])
    init_local_ray(cfg.server, num_cpus=2, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=cfg.server.app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
