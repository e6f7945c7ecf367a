"""The fences around Ray's and vLLM's non-public API: ``core/internals.py`` holds every use of
Ray's, ``engines/vllm_internals.py`` every use of vLLM's (each piece behind a function with a
start-up check; a backend's fence is a module of its own in ``engines/``), and no other module
of the layers reaches past the public API. Parsed with ``ast``, nothing imported: every ``.py``
under ``core/ engines/ nodes/ pipelines/ api/ apps/`` fails here, naming ``file:line``, when it
reaches past the public API of a package whose fence it is not (:data:`FENCES`): when it

(a) imports a Ray or vLLM module with a path component starting with ``_``
    (``ray.serve._private...``);
(b) imports a Ray or vLLM name that :data:`PUBLIC_MODULES`, :data:`PUBLIC_NAMES` and
    :func:`is_schema_module` do not declare public (``importlib`` paths written as
    ``"vllm.x.y:Name"`` strings count as imports);
(c) in a module that imports Ray or vLLM, reads an attribute starting with one ``_`` of an
    object other than ``self``/``cls`` (also through ``getattr``/``hasattr``/``setattr`` with
    a constant name), or passes a keyword argument starting with ``_`` (Ray's
    ``_internal=True``, ``_check_exists=False``);
(d) imports a ``_name`` of another mmserve module, or reads one off an mmserve module it
    imported (``apps/bench_config.py`` once took ``core.validate._check_with``).

What counts as public, and why:

- Ray: its API policy (docs.ray.io, "API Policy" and "API Stability") says an API that lives
  in an ``_internal``/``_private`` module or has an underscore prefix is never public, and that
  what its reference documents is PublicAPI or DeveloperAPI (DeveloperAPI being "explicitly
  exposed to advanced Ray users and library developers", e.g. ``serve.run_many``). The modules
  below are the ones the Ray Core and Ray Serve API references document: ``ray``,
  ``ray.exceptions``, ``ray.util`` and ``ray.util.metrics``, ``ray.util.placement_group`` and
  ``ray.util.scheduling_strategies``, ``ray.serve`` and its documented
  submodules ``handle``, ``exceptions``, ``schema`` and ``config``.
- vLLM: its deprecation policy (docs.vllm.ai, "Deprecation Policy") covers "public Python APIs
  for the vllm library" and "APIs in the OpenAI-compatible API server". Its API reference
  ("Summary") documents the top-level names (``vllm.__all__``: ``LLM``, ``AsyncEngineArgs``,
  ``SamplingParams``...; a public module's name must be in its ``__all__`` where it declares
  one), ``vllm.config``'s configuration classes, the engine arguments
  (``vllm.engine.arg_utils``), the inference parameters (``vllm.sampling_params``), the engines
  (``AsyncLLMEngine``, which is ``vllm.v1.engine.async_llm.AsyncLLM`` in V1, with the errors it
  raises, ``vllm.v1.engine.exceptions``, and ``vllm.exceptions``), and
  ``vllm.platforms.current_platform`` (the platform plugins' documented entry). The request and
  response models of the OpenAI-compatible server (``vllm/entrypoints/**/protocol.py``) are that
  server's API, which Ray Serve LLM imports as well: the upstream schemas mmserve reuses
  (docs/STYLE.md, "reuse an upstream schema where one exists").
- Everything else is not public, however stable it looks: vLLM's ``init_app_state``,
  ``make_arg_parser``, ``FlexibleArgumentParser``, ``create_error_response``, ``UsageContext``,
  ``vllm.utils.*``, the engine core's pieces (``vllm.v1.engine.core``/``utils``), Serve's
  handle internals. Those are used in their fences only (``engines/vllm_internals.py``,
  ``core/internals.py``).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "engines", "nodes", "pipelines", "api", "apps")
#: the one module that may reach past each package's public API, by module
FENCES = {"core/internals.py": "ray", "engines/vllm_internals.py": "vllm"}
MOVE_TO = " or ".join(FENCES)
FOREIGN = ("ray", "vllm")

#: modules of Ray and vLLM whose every name without a leading underscore is public API
PUBLIC_MODULES = frozenset({
    "ray", "ray.exceptions", "ray.util", "ray.util.metrics",
    # Ray Core's reference, "Placement Group" and "Scheduling Strategies"
    "ray.util.placement_group", "ray.util.scheduling_strategies",
    "ray.serve", "ray.serve.handle", "ray.serve.exceptions", "ray.serve.schema", "ray.serve.config",
    "vllm", "vllm.config", "vllm.engine.arg_utils", "vllm.sampling_params", "vllm.exceptions",
    "vllm.v1.engine.exceptions",
})
#: single public names of modules that are otherwise not
PUBLIC_NAMES = frozenset({"vllm.platforms.current_platform", "vllm.v1.engine.async_llm.AsyncLLM"})

_SCHEMA = re.compile(r"vllm\.entrypoints(\.\w+)*\.protocol")
_IMPORT_PATH = re.compile(r"((?:ray|vllm)(?:\.\w+)*):(\w+)")


def is_schema_module(module: str) -> bool:
    """A request/response schema module of vLLM's OpenAI-compatible server."""
    return bool(_SCHEMA.fullmatch(module))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _foreign(module: str) -> bool:
    return module.split(".")[0] in FOREIGN


def _public_module(module: str) -> bool:
    return module in PUBLIC_MODULES or is_schema_module(module)


@functools.cache
def declared_all(module: str) -> frozenset[str] | None:
    """The names of ``module``'s literal ``__all__`` (``vllm``: its top-level API), read from
    the installed source without importing it; None where it declares none."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level package: nothing is imported
    if spec is None or spec.origin is None:
        return None
    base = Path(spec.origin).parent.joinpath(*rest)
    source = next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)
    if source is None:
        return None
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            try:
                return frozenset(ast.literal_eval(node.value))
            except ValueError:  # built at import time: not declared literally
                return None
    return None


def check_import(module: str, name: str | None) -> str | None:
    """Why importing ``module`` (``import module``) or ``name`` from it is not allowed, or None.
    A name of a public module that declares ``__all__`` must be in it (or be a public module)."""
    path = module if name is None else f"{module}.{name}"
    if any(_private(part) for part in path.split(".")):
        return f"imports {path}: a private module or name of {path.split('.')[0]} (a part starts with _)"
    if name is None or _public_module(path) or path in PUBLIC_NAMES:
        ok = _public_module(path) or path in PUBLIC_NAMES
    elif _public_module(module):
        exported = declared_all(module)
        if exported is not None and name not in exported:
            return f"imports {path}: {module} is public, but its __all__ does not export {name}"
        ok = True
    else:
        ok = False
    return None if ok else f"imports {path}, which is not on the public API allowlist of this test"


def _layer_module(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in LAYERS


def violations(source: str, where: str, fenced: str | None = None) -> list[str]:
    """Every reach past Ray's, vLLM's or another mmserve module's public API in ``source``,
    as ``where:line: why``; ``fenced`` (``ray`` or ``vllm``): ``source`` is that package's
    fence, which may reach past its API alone (a private attribute is allowed only where the
    fence uses no other foreign package)."""
    tree = ast.parse(source)
    found: list[str] = []

    def report(node: ast.AST, why: str) -> None:
        found.append(f"{where}:{node.lineno}: {why}")

    def check(module: str, name: str | None) -> str | None:
        return None if module.split(".")[0] == fenced else check_import(module, name)

    uses_foreign = False
    own_modules: set[str] = set()  # names bound to mmserve modules here (import core.validate as v)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _foreign(alias.name):
                    uses_foreign = uses_foreign or alias.name.split(".")[0] != fenced
                    if why := check(alias.name, None):
                        report(node, why)
                elif _layer_module(alias.name):
                    own_modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _foreign(node.module):
                uses_foreign = uses_foreign or node.module.split(".")[0] != fenced
                for alias in node.names:
                    if why := check(node.module, alias.name):
                        report(node, why)
            elif _layer_module(node.module):
                for alias in node.names:
                    if _private(alias.name):
                        report(node, f"imports {alias.name} from {node.module}: a private name of "
                                     "another mmserve module (make it public there)")
                    else:
                        own_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if m := _IMPORT_PATH.fullmatch(node.value):
                if why := check(m.group(1), m.group(2)):
                    report(node, why)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in ("self", "cls"):
                continue
            if owner in own_modules and owner not in ("self", "cls"):
                report(node, f"reads {owner}.{node.attr}: a private name of an mmserve module")
            elif uses_foreign:
                report(node, f"reads .{node.attr} of {ast.unparse(node.value)}: a private attribute, "
                             f"in a module that uses Ray or vLLM (move it to its fence: {MOVE_TO})")
        elif isinstance(node, ast.Call) and uses_foreign:
            func = node.func.id if isinstance(node.func, ast.Name) else None
            if (func in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                    and _private(node.args[1].value)
                    and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))):
                report(node, f"{func}(..., {node.args[1].value!r}): a private attribute, in a module "
                             f"that uses Ray or vLLM (move it to its fence: {MOVE_TO})")
            for kw in node.keywords:
                if kw.arg and _private(kw.arg):
                    report(node, f"passes {kw.arg}=: a private parameter, in a module that uses Ray "
                                 f"or vLLM (move it to its fence: {MOVE_TO})")
    return found


def layer_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def test_only_the_fences_reach_past_ray_and_vllm_public_api():
    found = []
    for path in layer_files():
        where = path.relative_to(ROOT).as_posix()
        found += violations(path.read_text(), where, FENCES.get(where))
    assert not found, "\n".join(found)


def test_each_fence_holds_its_own_package_alone():
    """A fence may reach past its own package's API, never past the other's: vLLM's
    non-public names in Ray's fence (or the reverse) fail as anywhere else."""
    assert violations("from vllm.v1.engine.utils import CoreEngine\nx._y", "v.py", "vllm") == []
    assert violations("from ray.serve._private.common import DeploymentID\nh._router", "r.py", "ray") == []
    wrong = violations("from vllm.v1.engine.utils import CoreEngine", "r.py", "ray")
    assert len(wrong) == 1 and "allowlist" in wrong[0]
    wrong = violations("import vllm\nfrom ray.serve._private.common import D\nh._router", "v.py", "vllm")
    assert [w.split(": ", 1)[1].split(" ")[0] for w in wrong] == ["imports", "reads"]
    assert sorted(FENCES) == sorted(p for p in FENCES if (ROOT / p).is_file())


def test_the_fence_finds_each_kind_of_reach():
    """Each rule, on a snippet that breaks it and on one that does not: the check above cannot
    pass by finding nothing."""
    def why(source: str) -> list[str]:
        return [v.split(": ", 1)[1] for v in violations(source, "m.py")]

    # (a) a private module
    assert "private module" in why("from ray.serve._private.common import DeploymentID")[0]
    assert "private module" in why("import vllm._custom_ops")[0]
    # (b) a module or name off the allowlist
    assert "allowlist" in why("from vllm.utils.argparse_utils import FlexibleArgumentParser")[0]
    assert "allowlist" in why("from vllm.usage.usage_lib import UsageContext")[0]
    assert "allowlist" in why("from vllm.v1.engine.utils import CoreEngine")[0]
    assert "allowlist" in why("x = 'vllm.entrypoints.launchers.cli_args:make_arg_parser'")[0]
    assert why("from vllm import SamplingParams\nfrom ray.serve.exceptions import BackPressureError\n"
               "from ray import serve\nimport ray\nfrom vllm.platforms import current_platform\n"
               "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest\n"
               "x = 'vllm.entrypoints.pooling.embed.protocol:EmbeddingRequest'") == []
    assert "allowlist" in why("from vllm.platforms import cpu")[0]
    assert "__all__ does not export envs" in why("from vllm import envs")[0]
    # (c) a private attribute, getattr of one, a private keyword
    assert "reads ._router" in why("import ray\nh._router")[0]
    assert "getattr" in why("import ray\ngetattr(h, '_router', None)")[0]
    assert "_internal=" in why("from ray import serve\nd.options(version='1', _internal=True)")[0]
    assert why("import ray\nself._x\ncls._y\nx.__class__\ngetattr(self, '_z')") == []
    assert why("h._router\nf(_x=1)") == []  # no Ray or vLLM here: mmserve's own business
    # (d) a private name of another mmserve module
    assert "private name of another mmserve module" in why("from core.validate import _check_with")[0]
    assert "private name of an mmserve module" in why("from core import validate\nvalidate._merge")[0]


def test_the_allowlist_names_what_the_pinned_ray_and_vllm_have():
    import importlib
    import importlib.util

    for module in sorted(PUBLIC_MODULES):
        assert importlib.util.find_spec(module) is not None, f"{module}: not in this installation"
    for path in sorted(PUBLIC_NAMES):
        module, name = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), path


def test_the_fenced_vllm_server_pieces_work_on_the_pinned_vllm():
    """What ``engines.vllm_internals`` takes of vLLM's server, against the real vLLM (no
    engine): its start-up check passes, ``vllm serve``'s parser gives its defaults and options
    set by name, every option of ``vllm serve`` is read with its type, the usage context is the
    server's, and an exception becomes vLLM's error body."""
    from engines import vllm_internals as internals

    internals.check_vllm_server()
    args = internals.vllm_server_args("/models/m", "m", {"tool_call_parser": "hermes",
                                                         "enable_auto_tool_choice": True})
    assert (args.model, args.served_model_name, args.tool_call_parser) == ("/models/m", ["m"], "hermes")
    assert args.enable_auto_tool_choice is True and args.response_role == "assistant"  # a default
    types = internals.vllm_option_types()
    # every destination of vllm serve's parser but the few flags of its own process
    assert set(vars(args)) - set(types) <= {"model_tag", "headless", "api_server_count", "config", "grpc"}
    assert types["max_num_seqs"][1] == "engine" and types["tool_call_parser"][1] == "server"
    assert internals.vllm_usage_context().name == "OPENAI_API_SERVER"
    error = internals.vllm_error_response(ValueError("temperature: too hot"))
    assert (error.error.code, error.error.message) == (400, "temperature: too hot")
