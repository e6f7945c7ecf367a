"""The calls of the README's quick start ("One call per kind of model"), as a newcomer copies
them, run against a served set: the command that writes the sample media, each ``curl`` (with
``localhost:8000`` replaced by the set's address) and each Python block. Used by the integration
packages' ``test_readme.py``, each running the calls of the models it serves;
``tests/unit/test_docs.py`` checks that between them they serve every model the section names."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## One call per kind of model"
MODEL = re.compile(r'(?:"model(?:_id)?"|\\"model(?:_id)?\\"):\s*\\?"([^"\\]+)|-F model(?:_id)?=(\S+)|model="([^"]+)"')


@dataclass(frozen=True)
class Call:
    command: str          # as the README gives it, continuation lines joined
    kind: str             # "media" (writes the samples), "curl" or "python"
    models: tuple[str, ...]


def _blocks(text: str) -> list[tuple[str, str]]:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end != -1 else None]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[str]:
    """A bash block's commands: comment lines dropped, ``\\``-continued lines joined, and a
    line inside an open quoted string continued (as bash reads them)."""
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current = f"{current}{line}" if current.endswith(" ") else (f"{current}\n{line}" if current else line)
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        try:
            shlex.split(current)
        except ValueError:  # no closing quotation yet
            continue
        commands.append(current)
        current = ""
    return commands


def calls(readme: Path = ROOT / "README.md") -> list[Call]:
    out = []
    for lang, block in _blocks(readme.read_text()):
        if lang == "python":
            out.append(Call(block, "python", tuple(sorted({m for pair in MODEL.findall(block) for m in pair if m}))))
            continue
        for command in _commands(block):
            kind = "media" if "tests.media" in command else "curl"
            models = tuple(sorted({m for pair in MODEL.findall(command) for m in pair if m}))
            out.append(Call(command, kind, models))
    return out


def run(call: Call, url: str, cwd: Path) -> str:
    """Run ``call`` against the server at ``url`` in ``cwd`` (where the samples are); its
    output. Raises AssertionError if it fails or answers an error."""
    host = url.split("://", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if call.kind == "python":
        code = call.command.replace("http://127.0.0.1:8000", url)
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
    else:
        command = call.command.replace(".venv/bin/python", sys.executable).replace("localhost:8000", host)
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, f"{call.command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    if call.kind == "curl":
        check_answer(call, done.stdout)
    return done.stdout


def check_answer(call: Call, out: str) -> None:
    """A curl's answer is the model's: JSON naming the model (or SSE events of it), no error."""
    assert out.strip(), f"no answer to {call.command}"
    if out.startswith("data:") or "\ndata:" in out:
        events = [line[5:].strip() for line in out.splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), out[-2000:]
        return
    body = json.loads(out)
    assert "error" not in body, f"{call.command}\n{out[-2000:]}"
    named = body.get("model_id", body.get("model"))
    assert named is None or named in call.models, f"{call.command}: answered for {named!r}"


def served_calls(url: str, cwd: Path, served: set[str]) -> list[Call]:
    """Write the samples into ``cwd``, then run every call whose models are all in ``served``;
    the calls run."""
    done = []
    for call in calls():
        if call.kind == "media":
            run(call, url, cwd)
        elif call.models and set(call.models) <= served:
            run(call, url, cwd)
            done.append(call)
    return done
