"""Integration fixtures: one Ray Serve instance per test module, on a free port."""

from __future__ import annotations

import pytest

from apps.serving import free_port


@pytest.fixture(scope="module")
def serve_app(request):
    """Serve ``request.module.OVERRIDES`` (Hydra overrides) as the launcher does, on a local
    Ray of 2 CPUs, and yield its base URL."""
    from apps.config import compose
    from apps.serving import served

    cfg = compose([*request.module.OVERRIDES, f"server.port={free_port()}"])
    with served(cfg, num_cpus=2, logging_level="ERROR", log_to_driver=False) as server:
        yield server.url


@pytest.fixture(scope="module")
def http(serve_app):
    """An ``httpx`` client of the module's server."""
    import httpx

    with httpx.Client(base_url=serve_app, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(serve_app):
    """The ``openai`` package's client of the module's server (no retries)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_app}/v1", api_key="-", max_retries=0, timeout=120)
