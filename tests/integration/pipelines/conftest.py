"""One local Ray for the pipelines without vLLM (echo in every placement, the audio, vision and
video models, the load generator's known server): each module deploys its own application
(``request.module.OVERRIDES``) into it and deletes it afterwards, so that the modules do not
pay a Ray start and stop each. vLLM's set keeps a Ray of its own (tests/integration/vllm/),
started after this one has stopped."""

from __future__ import annotations

import pytest

from apps.serving import free_port


@pytest.fixture(scope="package")
def ray_session():
    from apps.config import compose
    from apps.serving import ray_serve
    from tests.support import NO_INGRESS_DRAIN

    server = compose(["model=[echo]", f"server.port={free_port()}", NO_INGRESS_DRAIN]).server
    with ray_serve(server, num_cpus=2, logging_level="ERROR", log_to_driver=False) as session:
        yield session


@pytest.fixture(scope="module")
def serve_app(request, ray_session):
    """``request.module.OVERRIDES`` served in the package's Ray, deleted after the module; the
    base URL."""
    from apps.config import compose
    from apps.serving import served

    cfg = compose([*request.module.OVERRIDES, f"server.port={ray_session.server.port}"])
    with served(cfg, session=ray_session) as server:
        yield server.url
