"""The servers a benchmark compares, all up at once, each frozen while another one is measured.

This machine's figures move by up to 30% from one minute to the next, with the CPU time its
hypervisor steals (``/proc/stat``). Started and stopped in turn, two servers are measured
minutes apart; kept up side by side, the idle one takes CPU from the busy one (a local Ray's
processes, about a tenth of a core). So each server runs in a process tree of its own, which
:meth:`Side.freeze` stops whole (``SIGSTOP``: no process of it runs, and none of its timers
fires) and :meth:`Side.thaw` lets go on: runs of different sides seconds apart, each with
the machine to itself.

A side is vLLM's own OpenAI server (:func:`vllm_side`) or mmserve serving a config
(:func:`mmserve_side`: ``python -m benchmarks.sides URL_FILE OVERRIDES...``, a process that
serves ``apps.serving.served`` of the config on a local Ray of its own and writes its URL to
``URL_FILE`` once the application runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx

from core.cpus import processes


def steal() -> tuple[int, int]:
    """(stolen, total) clock ticks of every CPU since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return fields[7], sum(fields)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the CPU time between two :func:`steal` readings that the hypervisor took."""
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def add_steal_args(parser: argparse.ArgumentParser) -> None:
    """``--max-stolen`` and ``--retries``, the arguments of :func:`least_stolen`."""
    parser.add_argument("--max-stolen", type=float, default=0.02, help=(
        "a run during which the hypervisor stole more than this share of the CPU time is run "
        "again (default 0.02)"))
    parser.add_argument("--retries", type=int, default=1, help=(
        "most runs again per run (default 1; 0 when the machine is stolen from all along)"))


def add_also_arg(parser: argparse.ArgumentParser, side: str = "mmserve side") -> None:
    """``--also "OVERRIDES"``, repeatable: one more ``side`` with these Hydra overrides
    (space-separated) on top, measured in the same rounds."""
    parser.add_argument("--also", action="append", default=[], metavar="OVERRIDES",
                        help=f"one more {side}, with these overrides (space-separated) on top: "
                             "an A/B within one run; repeatable")


def least_stolen(run: Callable[[], dict], max_stolen: float, retries: int) -> dict:
    """``run()``, a dict with the ``stolen`` share of its CPU time, done again while the
    hypervisor stole more than ``max_stolen`` of it, at most ``retries`` more times: the least
    stolen of the runs, with ``attempts``, how many there were."""
    attempts = []
    while len(attempts) <= retries:
        attempts.append(run())
        if attempts[-1]["stolen"] <= max_stolen:
            break
    best = min(attempts, key=lambda r: r["stolen"])
    best["attempts"] = len(attempts)
    return best


class Side:
    """One server of a comparison: ``cmd`` started in a process tree of its own, ready once
    ``{url}/health`` answers 200, or (``url_file``) once the server has written its URL there."""

    def __init__(self, name: str, cmd: list[str], url: str | None = None, url_file: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.url = url
        self.url_file = url_file
        self.proc: subprocess.Popen | None = None
        workdir = url_file.parent if url_file is not None else Path(tempfile.mkdtemp(prefix="mmserve-side-"))
        self.log = workdir / "output.log"

    def start(self, timeout_s: float = 900, settle_s: float = 3) -> None:
        """Start the server and wait until it serves, and then until ``/health`` has answered
        200 for ``settle_s`` seconds with no process of the side starting or ending (Serve
        reloads HAProxy just after an application turns running: frozen in the middle of
        that, HAProxy's manager would give up on it). Raises RuntimeError if the server exits
        first or is not ready in ``timeout_s``."""
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + timeout_s
        settled_since, tree = None, None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: exited ({self.proc.returncode}); its output: {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not ready in {timeout_s:g} s; its output: {self.log}")
            now_tree = set(self.pids())
            if self._url_known() and self._healthy() and now_tree == tree:
                settled_since = settled_since or time.monotonic()
                if time.monotonic() - settled_since >= settle_s:
                    return
            else:
                settled_since = None
            tree = now_tree
            time.sleep(0.5)  # polling the server's readiness

    def _url_known(self) -> bool:
        if self.url is None and self.url_file is not None and self.url_file.exists():
            self.url = self.url_file.read_text().strip() or None
        return self.url is not None

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def pids(self) -> list[int]:
        """The side's processes: its root and everything below it."""
        return [self.proc.pid, *processes(under=self.proc.pid)]

    def _signal_all(self, sig: int) -> None:
        # listed again until no new process shows up: one may fork while the others stop
        done: set[int] = set()
        while new := [p for p in self.pids() if p not in done]:
            for pid in new:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            done.update(new)

    def freeze(self) -> None:
        """Stop every process of the side (SIGSTOP) until :meth:`thaw`."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self, timeout_s: float = 30) -> None:
        """Let the side's processes run again; raises RuntimeError if it then does not answer
        ``/health`` within ``timeout_s``."""
        self._signal_all(signal.SIGCONT)
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not healthy after thawing; its output: {self.log}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """The side thawed for the ``with`` block (its URL yielded), frozen again after it."""
        self.thaw()
        try:
            yield self.url
        finally:
            self.freeze()

    def stop(self) -> None:
        """Let the side's processes run and stop them (SIGTERM, then SIGKILL to whatever of it
        is left after two minutes, or once its root has exited), healthy or not."""
        if self.proc is None:
            return
        tree = self.pids()
        self._signal_all(signal.SIGCONT)  # a stopped process does not act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def all_up(sides: list[Side]) -> Iterator[list[Side]]:
    """Start the sides one after the other (a start takes both cores), each frozen once it
    serves, for the ``with`` block; stop them all afterwards, also when this process gets
    SIGTERM (left frozen, a side would hold its ports and memory until killed by hand)."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for side in sides:
            side.start()
            side.freeze()
        yield sides
    finally:
        for side in sides:
            side.stop()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def engine_flags(model) -> list[str]:
    """``vllm serve`` flags for the model's vLLM options (as mmserve's engine passes them)."""
    from engines.vllm import VLLMKwargs

    return model.options(VLLMKwargs).serve_flags(cpu=True)


def vllm_side(model, name: str = "vllm", env: dict[str, str] | None = None) -> Side:
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.launchers.api_server.entry``, what ``vllm
    serve`` runs) for ``model``, with its engine arguments as mmserve passes them."""
    from apps.serving import free_port
    from engines.checkpoints import resolve_source

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model",
           resolve_source(model.source), "--served-model-name", model.model_id, "--host", "127.0.0.1",
           "--port", str(port), *engine_flags(model)]
    return Side(name, cmd, url=f"http://127.0.0.1:{port}", env=env)


@contextlib.contextmanager
def vllm_server(model, env: dict[str, str] | None = None) -> Iterator[str]:
    """vLLM's own OpenAI server for ``model`` for the ``with`` block, alone: yields its base
    URL once it is healthy."""
    side = vllm_side(model, env=env)
    try:
        side.start()
        yield side.url
    finally:
        side.stop()


def mmserve_side(overrides: list[str], name: str = "mmserve") -> Side:
    """mmserve serving the config of ``overrides`` (Hydra overrides) on a local Ray of its own."""
    from apps.serving import free_port

    url_file = Path(tempfile.mkdtemp(prefix="mmserve-side-")) / "url"
    return Side(name, [sys.executable, "-m", "benchmarks.sides", str(url_file),
                       f"server.port={free_port()}", *overrides], url_file=url_file)


def serve(url_file: str, overrides: list[str]) -> None:
    """Serve the config of ``overrides`` until SIGTERM; its URL goes to ``url_file`` once it runs."""
    from apps.config import compose
    from apps.serving import ShutdownRequested, served, wait_forever

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    cfg = compose(overrides)
    try:
        with served(cfg, log_to_driver=False, handle_signals=True) as server:
            tmp = Path(url_file + ".tmp")
            tmp.write_text(server.url)
            tmp.replace(url_file)  # whole, or not there
            wait_forever()
    except ShutdownRequested:
        pass


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
