"""Which CPUs Ray's own processes and the models' processes run on, on a host without GPUs.

An engine's CPU worker may bind its threads to every core but the last, which it leaves to the
rest of the engine (its frontend and core; the engine's ``Hosting.binds_cores`` says so). A
local Ray started next to it
runs a dozen processes of its own (raylet, GCS, Serve's controller, proxies, HAProxy, the
dashboard's agent, the log monitor), each waking many times a second; wherever Linux puts them on
the worker's core they can stall a decoding step. So the launcher starts such a Ray on
:func:`ray_cpus` (its processes, and the workers it forks, inherit the mask), and each process
that then runs a model's work (the ingress, a model's replicas, an engine core's actor)
takes every CPU back with :func:`for_models`; so does HAProxy, which every request and streamed
chunk passes through (the launcher moves it once Serve has started it). BENCHMARKS.md has the measurement
(the section on Ray's processes beside the engine's CPU worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Literal

logger = logging.getLogger("mmserve.cpus")

#: the CPUs a local Ray's model processes take back (``for_models``), set while the Ray starts
MODEL_CPUS_ENV = "MMSERVE_MODEL_CPUS"


def allowed() -> set[int]:
    """The CPUs this thread may run on (every CPU where the OS cannot say)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def ray_cpus(setting: Literal["auto", "all"] | list[int], cpus: set[int], gpus: int, binds_cores: bool) -> set[int] | None:
    """The CPUs for a local Ray's own processes, or None for all of ``cpus``.

    ``setting``: ``all``; ``auto``: the last CPU when the host has no GPU, some model's engine
    binds a worker to cores (its hosting's ``binds_cores``) and there are CPUs to spare; or a list of CPU
    ids, which must be among ``cpus``.

    Raises:
        ValueError: a listed CPU is not one this process may use.
    """
    if setting == "all":
        return None
    if setting == "auto":
        if gpus or not binds_cores or len(cpus) < 2:
            return None
        return {max(cpus)}  # the core such a worker leaves to the rest of its engine (see above)
    chosen = set(setting)
    if not chosen <= cpus:
        raise ValueError(f"CPUs {sorted(chosen - cpus)} are not among this machine's "
                         f"{sorted(cpus)} (the ones this process may use)")
    return None if chosen == cpus else chosen


def encode(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@contextlib.contextmanager
def confined(cpus: set[int] | None) -> Iterator[None]:
    """The calling thread on ``cpus`` (None: unchanged) for the ``with`` block: processes it
    starts meanwhile (a local Ray's) keep that mask."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    saved = allowed()
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def for_models() -> set[int] | None:
    """Let every thread of this process run on the CPUs of ``$MMSERVE_MODEL_CPUS`` (set by the
    launcher when it confined a local Ray; otherwise nothing changes). Threads and processes
    started afterwards inherit them. Returns the CPUs set, or None."""
    value = os.environ.get(MODEL_CPUS_ENV)
    if not value or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = {int(c) for c in value.split(",")}
    move(os.getpid(), cpus)
    return cpus


def move(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (what it starts afterwards inherits them).

    The threads are listed again until no new one shows up: one started meanwhile by a thread
    not yet moved has the old mask."""
    moved: set[str] = set()
    while True:
        try:
            tids = set(os.listdir(f"/proc/{pid}/task")) - moved
        except OSError:  # the process ended
            return
        if not tids:
            return
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except (ProcessLookupError, PermissionError):  # the thread ended meanwhile
                pass
            except OSError as err:  # a CPU gone offline: keep the mask Ray gave
                logger.warning("cpus: cannot move thread %s of %s to CPUs %s: %s", tid, pid, encode(cpus), err)
        moved |= tids


def move_with_what_it_starts(starter: str, program: str, cpus: set[int], *, under: int) -> None:
    """The processes ``starter`` below ``under`` onto ``cpus``, then every ``program`` below it.

    In that order: a ``program`` started after its starter moved inherits ``cpus``; one started
    before is there to be found when the programs are looked for. Every process below a starter
    moves too, whatever its name: a child forked before the starter moved that has not yet
    become ``program`` (it still bears the starter's title) keeps the mask it gets across its
    ``exec``.
    """
    starters = processes(starter, under=under)
    for pid in starters:
        move(pid, cpus)
    below = {pid for s in starters for pid in processes(under=s)}
    for pid in below | set(processes(program, under=under)):
        move(pid, cpus)


def processes(*names: str, under: int | None = None) -> list[int]:
    """Pids of the processes titled ``name...`` (``ray::HAProxyManager``) or whose program is
    ``name`` (``haproxy``), every process when no name is given; with ``under``, only
    descendants of that process (the Ray this process started, not another one on the
    machine)."""
    parents: dict[int, int] = {}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv0 = cmdline.read().split(b"\0", 1)[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):  # it ended meanwhile
            continue
        if not names or any(argv0.startswith(n) if "::" in n else os.path.basename(argv0) == n
                            for n in names):
            found.append(int(entry))
    if under is None:
        return found

    def descends(pid: int) -> bool:
        seen = set()
        while pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
            if pid == under:
                return True
        return False

    return [pid for pid in found if descends(pid)]
