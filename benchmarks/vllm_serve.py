"""mmserve's default config against vLLM's own OpenAI server, measured with vLLM's own client.

Each round serves the same model with the same engine arguments twice, one after the other:
vLLM's server (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs),
then mmserve (``apps.serving.served`` of ``model=[<model>]`` and any overrides, the default
placement unless an override says otherwise). At each concurrency, vLLM's benchmark client
(``vllm bench serve``: ``vllm.benchmarks.serve``, random dataset, ``--ignore-eos``) streams
``/v1/completions`` from each. Rounds go vllm, mmserve, vllm, mmserve...; each mmserve run is
compared with the vLLM run before it, and a level is summed up by the median of its rounds.

``python -m benchmarks.vllm_serve [--model tiny_llama] [--concurrency 1,8,32] [--rounds 3]
[--output-len 256] [--cpu] [--also "OVERRIDES"]... [overrides...]``

``--also`` adds a side to each round, mmserve with more overrides, compared with the same vLLM
run as the default side (the mmserve sides swap order from round to round): an A/B of a
setting within one run.

``--cpu`` also prints, for each run, the CPU seconds each process of the machine spent during it
(psutil; the benchmark client included), to see where each side's CPU goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Iterator

import httpx

from benchmarks.idle import cpu_seconds


def engine_flags(model) -> list[str]:
    """``vllm serve`` flags for the model's engine arguments (as mmserve's engine passes them)."""
    from engines.vllm import VLLMKwargs

    kw = model.options(VLLMKwargs)
    flags = []
    for key, value in kw.engine_args(cpu=True).items():
        if key == "structured_outputs_config":
            continue  # unused by plain completions
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags += [flag, str(value)]
    return flags + kw.server_args()


#: the busiest processes ``--cpu`` prints per run (its total counts them all)
CPU_LISTED = 12

#: how ``--cpu`` names this process
CLIENT = "this benchmark (vLLM's client)"


def cpu_spent(before: dict[int, tuple[str, float]]) -> list[tuple[str, float]]:
    """Every process that spent CPU since ``before`` (``benchmarks.idle.cpu_seconds``), 0.05 s
    or more, busiest first, as ``(name [pid], seconds)``; this process is vLLM's client."""
    me = os.getpid()
    spent = [(f"{CLIENT if pid == me else name} [{pid}]", t - before.get(pid, (name, 0.0))[1])
             for pid, (name, t) in cpu_seconds().items()]
    return sorted((s for s in spent if s[1] >= 0.05), key=lambda s: -s[1])


def bench(base_url: str, model_id: str, tokenizer: str, concurrency: int, input_len: int,
          output_len: int, per_slot: int, cpu: bool = False) -> dict:
    """One ``vllm bench serve`` run; the figures this benchmark reports (with ``cpu``, also
    each process's CPU seconds during it)."""
    from vllm.benchmarks.serve import add_cli_args, main

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", model_id, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(per_slot * concurrency), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--disable-tqdm", "--seed", "0", "--num-warmups", "2",
        "--percentile-metrics", "ttft", "--metric-percentiles", "50,99"])
    before = cpu_seconds() if cpu else {}
    r = main(args)
    out = {"tok_s": r["output_throughput"], "failed": r["failed"],
           "ttft_p50_ms": r["median_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"]}
    if cpu:
        out["duration_s"] = r["duration"]
        out["cpu_s"] = dict(cpu_spent(before))
    return out


def wait_healthy(server: subprocess.Popen, port: int, cmd: list[str], timeout_s: float = 600) -> None:
    """Until vLLM's server on ``port`` answers its own ``/health``; raises if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM's server exited ({server.returncode}): {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM's server not ready in {timeout_s:g} s")
        time.sleep(1)  # polling vLLM's readiness endpoint


@contextlib.contextmanager
def vllm_server(model) -> Iterator[str]:
    """vLLM's own OpenAI server for ``model`` (its engine arguments as mmserve passes them) on
    a free port, for the ``with`` block: yields its base URL once it is healthy."""
    from apps.serving import free_port
    from engines.checkpoints import resolve_source

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           resolve_source(model.source), "--served-model-name", model.model_id, "--host", "127.0.0.1",
           "--port", str(port), *engine_flags(model)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(server, port, cmd)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(60)


def run_vllm(cfg, model, levels, opts) -> dict[int, dict]:
    """vLLM's own server, benchmarked at each level, then stopped."""
    from engines.checkpoints import resolve_source

    with vllm_server(model) as url:
        return {c: bench(url, model.model_id, resolve_source(model.source), c, opts.input_len,
                         opts.output_len, opts.per_slot, opts.cpu) for c in levels}


def run_mmserve(cfg, model, levels, opts) -> dict[int, dict]:
    from apps.serving import served
    from engines.checkpoints import resolve_source

    with served(cfg, log_to_driver=False) as server:
        return {c: bench(server.url, model.model_id, resolve_source(model.source), c, opts.input_len,
                         opts.output_len, opts.per_slot, opts.cpu) for c in levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_llama", help="conf/model key (default tiny_llama)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--per-slot", type=int, default=8, help="requests per client slot")
    parser.add_argument("--cpu", action="store_true", help="print each process's CPU seconds per run")
    parser.add_argument("--also", action="append", default=[], metavar="OVERRIDES",
                        help="one more mmserve side in each round, with these overrides (space-"
                             "separated) on top: an A/B within one run; repeatable")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the mmserve side")
    opts = parser.parse_args()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

    from apps.config import compose
    from apps.serving import free_port

    cfg = compose([f"model=[{opts.model}]", f"server.port={free_port()}", *opts.overrides])
    model = cfg.model[opts.model]
    levels = [int(c) for c in opts.concurrency.split(",")]
    sides = {"mmserve": cfg}
    for extra in opts.also:
        sides[f"mmserve {extra}"] = compose([f"model=[{opts.model}]", f"server.port={free_port()}",
                                             *opts.overrides, *extra.split()])
    rounds = []
    for i in range(opts.rounds):
        rounds.append({"vllm": run_vllm(cfg, model, levels, opts)})
        order = list(sides.items())
        for side, side_cfg in order[::-1] if i % 2 else order:  # neither always nearer vLLM's run
            rounds[-1][side] = run_mmserve(side_cfg, side_cfg.model[opts.model], levels, opts)
        print(json.dumps({"round": i + 1, **rounds[-1]}), flush=True)
        if opts.cpu:
            for side in rounds[-1]:
                for c in levels:
                    run = rounds[-1][side][c]
                    spent = run["cpu_s"]
                    print(f"CPU seconds, round {i + 1}, {side}, c={c}: {sum(spent.values()):.1f} in "
                          f"{run['duration_s']:.1f} s")
                    for name, s in list(spent.items())[:CPU_LISTED]:
                        print(f"  {s:7.2f}  {name[:70]}")

    for side in sides:
        print(f"\n{side}: {model.model_id}, placement {model.deployment.placement}, {opts.rounds} "
              f"rounds, {opts.input_len} in / {opts.output_len} out tokens, vllm bench serve "
              "(--ignore-eos), each against the round's vLLM run")
        table(rounds, side, levels)


def table(rounds: list[dict], side: str, levels: list[int]) -> None:
    """Medians over the rounds of ``side`` against vLLM's runs."""
    print(f"{'c':>3} | {'vLLM tok/s':>11} | {'mmserve tok/s':>13} | {'ratio (median)':>14} | "
          f"{'TTFT p50 +ms':>12} | {'TTFT p99 x':>10} | failed")
    for c in levels:
        own = [r["vllm"][c] for r in rounds]
        ours = [r[side][c] for r in rounds]
        ratio = statistics.median(o["tok_s"] / v["tok_s"] for o, v in zip(ours, own))
        ttft = statistics.median(o["ttft_p50_ms"] - v["ttft_p50_ms"] for o, v in zip(ours, own))
        p99 = statistics.median(o["ttft_p99_ms"] / v["ttft_p99_ms"] for o, v in zip(ours, own))
        print(f"{c:>3} | {statistics.median(v['tok_s'] for v in own):>11,.0f} | "
              f"{statistics.median(o['tok_s'] for o in ours):>13,.0f} | {ratio:>14.2f} | "
              f"{ttft:>+12.1f} | {p99:>10.2f} | {sum(o['failed'] for o in ours)}")


if __name__ == "__main__":
    main()
