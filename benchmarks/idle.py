"""CPU that Ray and Serve take while serving nothing: Serve's control plane at Ray's defaults and
at mmserve's (``server.serve_env`` in ``conf/server/default.yaml``), one after the other in one run.

Each side serves the config on a local Ray as the launcher does (``apps.serving.served``; the
echo pipeline by default), lets start-up finish, then reads the CPU time of every process
that Ray started (``/proc``) over a window with no requests. On a small machine that CPU is taken
from the models whenever they are busy.

``python -m benchmarks.idle [--seconds 30] [overrides...]`` prints a table per process.
"""

from __future__ import annotations

import argparse
import os
import time

# Serve's own defaults for the control-plane settings of conf/server/default.yaml
# (ray.serve._private.constants)
RAY_DEFAULTS = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100"}


def label(argv: list[str]) -> str:
    """A process's name as ``top`` would want it: ``ray::ServeController``, ``gcs_server``,
    ``log_monitor.py``, ``vllm.entrypoints.launchers.api_server.entry`` (``python -m``)."""
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):  # Ray retitles an actor's process with the method it runs
        return argv[0].split()[0].split(".")[0]
    if os.path.basename(argv[0]).startswith("python"):
        if "-m" in argv[1:-1]:
            return argv[argv.index("-m", 1) + 1]
        script = next((a for a in argv[1:] if a.endswith(".py")), argv[-1])
        return os.path.basename(script)
    return os.path.basename(argv[0])


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """(label, user + system CPU seconds) of every process, by pid (psutil, as benchmarks.soak)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        times = p.info["cpu_times"]
        if times is not None:  # None: exited or not ours to read
            out[p.info["pid"]] = (label(p.info["cmdline"] or []), times.user + times.system)
    return out


def measure(cfg, seconds: float, settle_s: float) -> dict[str, float]:
    """Percent of one core per process label that the Ray started for ``cfg`` takes idle."""
    from apps.serving import served

    before = set(cpu_seconds())
    with served(cfg, app_name="idle", logging_level="ERROR", log_to_driver=False):
        # served: the app is running. Start-up's own bursts (imports, the controller
        # reconciling new replicas) end within seconds; the window starts after them.
        time.sleep(settle_s)
        a, t0 = cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        b, dt = cpu_seconds(), time.monotonic() - t0
    shares: dict[str, float] = {}
    for pid in set(a) & set(b) - before - {os.getpid()}:
        name, cpu = b[pid]
        shares[name] = shares.get(name, 0.0) + 100 * (cpu - a[pid][1]) / dt
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after start-up before the window")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default: model=[echo])")
    args = ap.parse_args()

    from apps.config import compose
    from apps.serving import free_port

    cfg = compose(args.overrides or ["model=[echo]"])
    sides = {}
    for name, env in (("Ray's defaults", RAY_DEFAULTS), ("mmserve", {})):
        side = cfg.model_copy(deep=True)
        side.server.serve_env = {**side.server.serve_env, **env}
        side.server.port = free_port()
        sides[name] = measure(side, args.seconds, args.settle)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"idle CPU, % of one core over {args.seconds:.0f} s, http_proxy {cfg.server.http_proxy}, "
                        f"{os.cpu_count()} CPUs")
    table.add_column("process")
    for name in sides:
        table.add_column(name, justify="right")
    names = sorted({n for s in sides.values() for n in s}, key=lambda n: -max(s.get(n, 0.0) for s in sides.values()))
    for n in names:
        if max(s.get(n, 0.0) for s in sides.values()) >= 0.1:
            table.add_row(n, *(f"{s.get(n, 0.0):.1f}" for s in sides.values()))
    table.add_row("total", *(f"{sum(s.values()):.1f}" for s in sides.values()))
    Console().print(table)


if __name__ == "__main__":
    main()
