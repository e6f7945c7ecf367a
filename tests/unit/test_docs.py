"""The docs match the code: the configuration reference is the one the schemas generate, and
what README.md and docs/ cite (links and their anchors, project paths, modules and the names in
them, config keys, make targets, mmserve commands) exists. No Ray, nothing started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apps import cli, config_reference
from apps.bench_config import BenchConfig, LoadConfig
from core.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PACKAGES = ("core", "engines", "nodes", "pipelines", "api", "apps", "tests", "benchmarks")
PATH_ROOTS = (*PACKAGES, "conf", "scripts", "docs", "requirements")

#: keys the docs show as mistakes on purpose (what an invalid config says)
INVALID_ON_PURPOSE = {"model.echo.bogus", "load.concurency"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_of(text: str) -> str:
    """Every fenced block and inline code span of a Markdown text, one per line."""
    fences = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return "\n".join(fences + re.findall(r"`([^`\n]+)`", prose))


def prose_of(text: str) -> str:
    return re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)


# --- the generated reference ---------------------------------------------------------------

def test_the_configuration_reference_is_the_one_the_schemas_generate():
    committed = (ROOT / "docs/configuration.md").read_text()
    assert committed == config_reference.render(), (
        "docs/configuration.md is stale: run `python -m apps.config_reference` (or `make docs`) "
        "and commit the result")


def test_every_documented_schema_field_has_a_description():
    assert not config_reference.missing_descriptions(), (
        "add description= to these fields (docs/configuration.md is generated from them): "
        + ", ".join(config_reference.missing_descriptions()))


def test_the_readme_reads_in_ten_minutes():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines < 250, f"README.md has {lines} lines; move reference material into docs/"


def test_every_decision_record_is_in_the_index():
    index = (ROOT / "docs/decisions/README.md").read_text()
    records = sorted(p.name for p in (ROOT / "docs/decisions").glob("[0-9][0-9][0-9][0-9]-*.md"))
    assert records
    assert [r for r in records if f"({r})" not in index] == []
    numbers = [r[:4] for r in records]
    assert numbers == [f"{i:04d}" for i in range(1, len(records) + 1)], "records are numbered 0001, 0002, ..."


# --- links ---------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_of(path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.*)", line):
            s = slug(m.group(1))
            out.add(f"{s}-{seen[s]}" if s in seen else s)
            seen[s] = seen.get(s, 0) + 1
    return out


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_links_lead_somewhere(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose_of(doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {rel(dest)}")
    assert not broken, f"{rel(doc)}:\n" + "\n".join(broken)


# --- what the docs cite --------------------------------------------------------------------

def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def defines(source: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async def|def|class) {name}\b|^\s*{name}\s*[:=]|import .*\b{name}\b",
                     source, flags=re.M) is not None


def undefined_names(code: str) -> list[str]:
    """Dotted project names (``apps.serving.served``, ``apps.builder:step_from_args``) whose
    module, or whose attributes in that module, do not exist."""
    missing = []
    for dotted in set(re.findall(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})(?:[.:]\w+)+)", code)):
        parts = re.split(r"[.:]", dotted)
        for cut in range(len(parts), 0, -1):
            if (found := module_file(".".join(parts[:cut]))) is not None:
                break
        else:
            missing.append(f"{dotted}: no module")
            continue
        source = found.read_text()
        missing += [f"{dotted}: {found.relative_to(ROOT)} has no {name}"
                    for name in parts[cut:] if not defines(source, name)]
    return missing


def resolves(schema, parts: list[str]) -> bool:
    """Whether a dotted key exists in ``schema``; keys inside maps of plain values are free."""
    while parts:
        name, parts = parts[0], parts[1:]
        if name not in schema.model_fields:
            return False
        inner = list(config_reference._models_in(schema.model_fields[name].annotation))
        if not inner:
            return True
        schema, rest = inner[0]
        if rest:  # a map of schemas: the next part is any key
            parts = parts[1:]
    return True


def unknown_keys(code: str) -> list[str]:
    roots = {"load": LoadConfig, "bench": BenchConfig}
    out = []
    for key in set(re.findall(r"(?<![\w.$/-])((?:server|deployment|pipeline|model|load|bench)(?:\.\w+)+)", code)):
        parts = key.split(".")
        if parts[-1] in ("yaml", "py", "md", "json"):  # a file, such as bench.yaml
            continue
        schema = roots.get(parts[0])
        ok = resolves(schema, parts[1:]) if schema else resolves(AppConfig, parts)
        if not ok and key not in INVALID_ON_PURPOSE:
            out.append(key)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_what_the_docs_cite_exists(doc):
    code = code_of(doc.read_text())
    problems = []
    for module in set(re.findall(r"python -m ([\w.]+)", code)):
        if module.split(".")[0] in PACKAGES and module_file(module) is None:
            problems.append(f"python -m {module}: no such module")
    for path in set(re.findall(rf"(?<![\w./~:-])((?:{'|'.join(PATH_ROOTS)})/[\w./-]*+)(?![*{{<])", code)):
        if not (ROOT / path.rstrip(".")).exists():
            problems.append(f"{path}: no such file")
    problems += undefined_names(code)
    problems += [f"{k}: not a config key (core/config.py, apps/bench_config.py)" for k in unknown_keys(code)]
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", code, flags=re.M)):
        if not re.search(rf"^{target}:", makefile, flags=re.M):
            problems.append(f"make {target}: no such target")
    for command in set(re.findall(r"(?:^|`|\$ )mmserve ([a-z]+)", code, flags=re.M)):
        if command not in cli.COMMANDS:
            problems.append(f"mmserve {command}: no such command")
    assert not problems, f"{rel(doc)}:\n" + "\n".join(sorted(problems))


def test_every_quick_start_call_of_the_readme_is_run_by_an_integration_set():
    """Each call of the README's quick start names models of the embedded default, and one of
    the integration sets serves them all (their test_readme tests run it)."""
    from apps.config import compose
    from tests.integration.pipelines.test_media_serve import MODELS as MEDIA
    from tests.integration.vllm.test_first_minute import VLLM_MODELS
    from tests.readme_calls import calls

    default = {m.model_id for m in compose([]).model.values()} | {"tiny-llama-lora"}
    sets = [set(MEDIA), {*VLLM_MODELS, "echo", "tiny-llama-lora"}]
    found = calls()
    assert [c.kind for c in found].count("media") == 1 and len(found) >= 13
    for call in found:
        if call.kind != "media":
            assert call.models and set(call.models) <= default, call.command
            assert any(set(call.models) <= s for s in sets), call.command
