"""What a local Ray costs vLLM's own server when it merely runs beside it, and what keeping Ray's
processes on one CPU (``server.ray_cpus``, core.cpus) gives back.

Each round serves the model of ``benchmarks.vllm_serve`` from vLLM's own OpenAI server three
times, read by vLLM's own benchmark client at each concurrency: alone; beside an idle local Ray
Serve that mmserve started for the echo model, its processes on every CPU
(``server.ray_cpus=all``); and beside the same on the last CPU only (what ``auto`` picks on a
host without GPUs where a model's engine binds a vLLM CPU worker). Nothing is sent to the Ray:
what it costs is its processes waking next to vLLM's. The sides alternate within each round; the
table gives medians of the rounds, as ratios to the run alone.

``python -m benchmarks.ray_beside [--rounds 2] [--concurrency 1,8,32] [--model tiny_llama]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics

from benchmarks.sides import vllm_server
from benchmarks.vllm_serve import bench

SIDES = ("alone", "Ray on every CPU", "Ray on the last CPU")


@contextlib.contextmanager
def beside(side: str):
    """An idle local Ray Serve of the echo model for the ``with`` block (none for ``alone``)."""
    if side == "alone":
        yield
        return
    from apps.config import compose
    from apps.serving import free_port, served
    from core import cpus

    where = "all" if side == "Ray on every CPU" else f"[{max(cpus.allowed())}]"
    cfg = compose(["model=[echo]", f"server.port={free_port()}", f"server.ray_cpus={where}"])
    with served(cfg, app_name="beside", logging_level="ERROR", log_to_driver=False):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_llama", help="conf/model key (default tiny_llama)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--per-slot", type=int, default=8, help="requests per client slot")
    opts = parser.parse_args()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

    from apps.config import compose
    from engines.checkpoints import resolve_source

    model = compose([f"model=[{opts.model}]"]).model[opts.model]
    levels = [int(c) for c in opts.concurrency.split(",")]
    tok_s: dict[tuple[str, int], list[float]] = {}
    for i in range(opts.rounds):
        for side in SIDES:
            with beside(side), vllm_server(model) as url:
                for c in levels:
                    run = bench(url, model.model_id, resolve_source(model.source), c, 32,
                                opts.output_len, opts.per_slot)
                    tok_s.setdefault((side, c), []).append(run["tok_s"])
                    print(f"round {i + 1}, {side}, c={c}: {run['tok_s']:,.0f} tok/s, "
                          f"{run['failed']} failed", flush=True)

    print(f"\nvLLM's own server ({model.model_id}), {opts.rounds} rounds, vllm bench serve, "
          f"32 in / {opts.output_len} out tokens; tok/s, medians (ratio to alone)")
    print(f"{'c':>3} | " + " | ".join(f"{s:>26}" for s in SIDES))
    for c in levels:
        alone = statistics.median(tok_s[("alone", c)])
        cells = []
        for side in SIDES:
            m = statistics.median(tok_s[(side, c)])
            cells.append(f"{m:>17,.0f} ({m / alone:.2f})")
        print(f"{c:>3} | " + " | ".join(f"{x:>26}" for x in cells))


if __name__ == "__main__":
    main()
