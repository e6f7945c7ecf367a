"""The packages import only downward, core → engines → nodes → pipelines → api → apps (then
tests, whose media helpers the benchmarks use, then benchmarks), and no module-level imports
form a cycle: checked over the whole tree. Imports for type hints only (``if TYPE_CHECKING:``)
are not imports at run time and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["core", "engines", "nodes", "pipelines", "api", "apps", "tests", "benchmarks"]


def modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The project modules ``path`` imports (anywhere in it, or only at module level)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # drop `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in LAYERS}


def test_no_module_imports_a_layer_above_its_own():
    mods = modules()
    upward = []
    for name, path in mods.items():
        layer = LAYERS.index(name.split(".")[0])
        for target in imports(path, top_level_only=False):
            if target in mods and LAYERS.index(target.split(".")[0]) > layer:
                upward.append(f"{name} imports {target}")
    assert not upward, "\n".join(sorted(upward))


def test_module_level_imports_have_no_cycle():
    mods = modules()
    graph = {name: {t for t in imports(path, top_level_only=True) if t in mods and t != name}
             for name, path in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
