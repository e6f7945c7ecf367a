"""Schemathesis against the ingress's own OpenAPI schema, every route: echo pipelines behind
/v1/infer, and behind the OpenAI-compatible routes a model that reads each request with vLLM's
own request models. No 5xx, and every response conforms to the schema (status codes, content
types, bodies). The schema lists the served model ids, so generated cases reach a pipeline."""

from __future__ import annotations

import asyncio

import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, settings

from core.config import ServerConfig
from api.app import create_app
from tests.support import VLLMProtocolEngine, local_pipeline, local_router, model

router = asyncio.run(local_router(local_pipeline(model("echo")), local_pipeline(model("org/echo2")),
                                  local_pipeline(model("llm"), VLLMProtocolEngine)))
app = create_app(router, ServerConfig(max_body_bytes=64 * 1024, max_request_timeout_s=2))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
schema.config.generation.update(modes=list(schemathesis.GenerationMode))  # valid and invalid data


# Excluded: "schema-valid data must be accepted". Params are checked by each model's engine and
# model ids against the served ones, which an OpenAPI schema cannot express; those refusals are
# 4xx by design. Every other check runs: no 5xx, documented status codes, content types,
# response bodies and headers that match the schema.
EXCLUDED = [checks.positive_data_acceptance]


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_against_its_schema(case):
    # A form carries strings only: what a JSON schema calls a wrong type (params as an array,
    # say) cannot be told apart from a string there, so schema-invalid forms are not expected
    # to be refused; the uploads' own checks are in tests/unit/test_media.py.
    form = case.media_type == "multipart/form-data"
    case.call_and_validate(excluded_checks=EXCLUDED + ([checks.negative_data_rejection] if form else []))
