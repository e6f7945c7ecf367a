"""The generic layers name no backend: an engine owns how it is hosted (``Engine.hosting``), so
``core/ nodes/ pipelines/ api/ apps/`` hold no name, string, comment or docstring that says
``vllm``, ``engine_core`` or ``whisper`` (any case). Only the engine registry
(``core/registry.py``) maps config names to backends; a backend is a module of ``engines/``."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "nodes", "pipelines", "api", "apps")
REGISTRY = "core/registry.py"
BACKEND = re.compile(r"vllm|engine_core|whisper", re.IGNORECASE)
KINDS = {tokenize.NAME: "name", tokenize.STRING: "string", tokenize.COMMENT: "comment"}


def backend_names(source: str, where: str) -> list[str]:
    """Every backend word in ``source``'s names, strings (docstrings included) and comments,
    as ``where:line: kind 'word'``."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = KINDS.get(tok.type)
        if kind is None:
            continue
        for match in BACKEND.finditer(tok.string):
            line = tok.start[0] + tok.string.count("\n", 0, match.start())
            found.append(f"{where}:{line}: {kind} {match.group()!r}")
    return found


def generic_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")
                  if p.relative_to(ROOT).as_posix() != REGISTRY)


def test_the_generic_layers_name_no_backend():
    found = [f for path in generic_files()
             for f in backend_names(path.read_text(), path.relative_to(ROOT).as_posix())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, kind", [
    ("from engines import whisper\n", "name"),
    ("x = 'for vLLM models'\n", "string"),
    ("x = 1  # as Whisper does\n", "comment"),
    ('def f():\n    """Runs the\n    engine_core."""\n', "string"),
    ("placement = f'{p}: engine_core'\n", "string"),
])
def test_each_kind_of_mention_is_found(source, kind):
    found = backend_names(source, "m.py")
    assert len(found) == 1 and f": {kind} " in found[0], found


def test_a_docstrings_mention_is_found_on_its_own_line():
    assert backend_names('"""One line.\n\nOn vLLM."""\n', "m.py") == ["m.py:3: string 'vLLM'"]


def test_the_generic_words_pass():
    assert backend_names("engine = Hosting(core_actors=1)  # the engine's core\n", "m.py") == []


def test_the_registry_is_the_one_exception_and_names_backends():
    assert backend_names((ROOT / REGISTRY).read_text(), REGISTRY)
    assert REGISTRY not in {p.relative_to(ROOT).as_posix() for p in generic_files()}
