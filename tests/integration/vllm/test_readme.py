"""The README's quick-start calls of the models this set serves, run as a newcomer copies them
(``tests/readme_calls.py``): text, streaming, chat, rerank, the LoRA adapter, speech to text,
vision-language chat, echo and the Python client's block."""

from __future__ import annotations

import pytest

from tests.readme_calls import calls, served_calls

pytestmark = pytest.mark.integration


def test_every_readme_call_for_this_sets_models_answers_as_the_readme_says(serve_app, http, tmp_path):
    served = {m["id"] for m in http.get("/v1/models").json()["data"]}
    done = served_calls(serve_app, tmp_path, served)
    expected = [c for c in calls() if c.models and set(c.models) <= served]
    assert done == expected and len(done) >= 9, [c.command[:60] for c in done]
