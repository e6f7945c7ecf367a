"""The text default's model behind two ingress replicas: each hosts its own vLLM frontend and
engine core (``placement: remote_core``), so losing one replica loses its engine too. The other
serves every request meanwhile; the replacement starts an engine of its own and joins HAProxy's
rotation only once it is up, so that no request meets its 503 'starting'.

Marked slow (``make test-all``): a Ray and three vLLM start-ups of its own (two replicas and the
replacement), for what the echo case in the default suite shows of the ingress
(tests/integration/pipelines/test_ingress_replicas.py).
"""

from __future__ import annotations

import pytest

from tests.integration.pipelines.test_ingress_replicas import lose_one_ingress_replica

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = ["model=[tiny_llama]", "pipeline=[text]", "deployment.ingress.num_replicas=2"]


def test_losing_one_ingress_replica_of_the_text_model_refuses_nothing(serve_app):
    body = {"model_id": "tiny-llama", "prompt": "Hello", "params": {"max_tokens": 4, "temperature": 0}}
    lose_one_ingress_replica(serve_app, body, lambda answer: answer["usage"]["completion_tokens"] == 4,
                             comeback_s=300)
