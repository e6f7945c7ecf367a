"""``mmserve <command> [args]``: the one command a ``pip install`` of the project gives. Each
command is a module that ``python -m`` runs, and takes that module's arguments unchanged; Hydra's
own flags (``--cfg job``, ``-m``, ``--help``) included.

The module a command runs is imported only once the command is known (it brings Hydra, Ray or
an engine's backend), so that ``mmserve --help`` answers at once.
"""

from __future__ import annotations

import sys
from typing import Callable


def usage() -> str:
    """One line a command, with the ``python -m`` line it stands for (what the docs show)."""
    name_w = max(map(len, COMMANDS))
    what_w = max(len(what) for what, _, _ in COMMANDS.values())
    lines = [f"  {name:<{name_w}}  {what:<{what_w}}  = {module}"
             for name, (what, module, _) in COMMANDS.items()]
    return "\n".join([
        "usage: mmserve <command> [args...]",
        "       mmserve --help | --version",
        "",
        "commands:",
        *lines,
        "",
        "A command takes its module's arguments: Hydra overrides and flags (--cfg job, -m, --help)",
        "for launch, update and sweep; see `mmserve <command> --help`.",
    ])


def version() -> str:
    """The installed distribution's version; "unknown" when run from a checkout not installed."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("mmserve")
    except PackageNotFoundError:
        return "unknown"


def run_hydra(app: Callable[[], object], prog: str, args: list[str]) -> None:
    """Run a ``@hydra.main`` app on ``args``: Hydra reads its arguments from ``sys.argv``, and
    names the program (in its ``--help``) after ``sys.argv[0]``."""
    saved = sys.argv
    sys.argv = [prog, *args]
    try:
        app()
    finally:
        sys.argv = saved


def launch(args: list[str], update: bool = False) -> None:
    """``python -m apps.launch [--update]``: the launcher reads ``--update`` (anywhere in its
    arguments, not a Hydra flag) into its module's ``UPDATING`` before Hydra starts."""
    from apps import launch as app

    update = update or app.UPDATE_FLAG in args
    app.UPDATING = update
    try:
        run_hydra(app.main, "mmserve update" if update else "mmserve launch",
                  [a for a in args if a != app.UPDATE_FLAG])
    finally:
        app.UPDATING = False


def export(args: list[str]) -> None:
    from apps import export as app

    app.main(args)


def sweep(args: list[str]) -> None:
    from apps import bench

    run_hydra(bench.main, "mmserve sweep", args)  # its return value is for a search sweeper


#: command -> (what it does, the ``python -m`` line it equals, what runs it); the usage lists
#: them in this order
COMMANDS: dict[str, tuple[str, str, Callable[[list[str]], None]]] = {
    "launch": ("validate, show, deploy and serve the config", "python -m apps.launch", launch),
    "update": ("have the running launcher serve this config, in place", "python -m apps.launch --update",
               lambda args: launch(args, update=True)),
    "export": ("write it as a Serve config file and a KubeRay RayService", "python -m apps.export", export),
    "sweep": ("benchmark a served config; with -m, each of a grid", "python -m apps.bench", sweep),
}


def main(argv: list[str] | None = None) -> None:
    """Returns None (status 0) once the command is done; the commands exit with theirs (2 for an
    invalid config), and this one with 2 for a missing or unknown command."""
    args = sys.argv[1:] if argv is None else list(argv)
    command, rest = (args[0], args[1:]) if args else (None, [])
    if command in ("-h", "--help"):
        print(usage())
    elif command in ("-V", "--version"):
        print(f"mmserve {version()}")
    elif command in COMMANDS:
        COMMANDS[command][2](rest)
    else:
        if command is not None:
            print(f"mmserve: unknown command {command!r}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
