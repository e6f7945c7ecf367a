"""The type checker on the layers (``[tool.mypy]`` in pyproject.toml): the step contract
(``pipelines.stages.Step`` and its node and engine kinds), the engine contract
(``engines.base.Engine``) and every call between layers are checked, so that a step that stops
fitting the contract, or a caller that passes the wrong thing, fails here rather than in a
replica."""

from __future__ import annotations

import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _mypy(*args: str) -> tuple[str, int]:
    from mypy import api

    out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), *args])
    return out + err, status


def test_the_layers_type_check(monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's `files` are relative to the root
    out, status = _mypy()
    assert status == 0, out


def test_a_step_that_breaks_the_contract_is_caught(tmp_path, monkeypatch):
    """The check can fail: a node step without ``stop`` passed to a pipeline."""
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad_step.py"
    bad.write_text(textwrap.dedent("""
        from typing import Any
        from pipelines.stages import NodeStep

        class HalfStep:
            async def start(self) -> None: ...
            async def __call__(self, payload: Any, ctx: Any) -> Any: ...

        def use(step: NodeStep) -> None: ...

        use(HalfStep())
    """))
    out, status = _mypy(str(bad))
    assert status == 1 and "NodeStep" in out, out
