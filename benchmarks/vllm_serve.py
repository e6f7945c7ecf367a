"""mmserve's default config against vLLM's own OpenAI server, measured with vLLM's own client.

Both serve the same model with the same engine arguments: vLLM's server (``python -m
vllm.entrypoints.launchers.api_server.entry``, what ``vllm serve`` runs) and mmserve (``apps.serving.served``
of ``model=[<model>]`` and any overrides, the default placement unless an override says
otherwise), each in a process tree of its own (``benchmarks.sides``). They are started one
after the other and then stay up, every side frozen but the one being measured, so that runs
compared with each other are seconds apart, each with the machine to itself. At each
concurrency, in each round, vLLM's benchmark client (``vllm bench serve``:
``vllm.benchmarks.serve``, random dataset, ``--ignore-eos``) streams ``/v1/completions`` from
each side in turn (the order reverses from round to round); each mmserve run is compared with
the vLLM run of its round and level, and a level is summed up by the median of its rounds.
Each run also records the share of CPU time the hypervisor stole meanwhile (``/proc/stat``),
which moves figures on this machine more than anything else: a run during which it stole more
than ``--max-stolen`` is run again, up to ``--retries`` times (the table counts them), and
the run it stole least from counts.

``python -m benchmarks.vllm_serve [--model tiny_llama] [--concurrency 1,8,32] [--rounds 5]
[--output-len 256] [--max-stolen 0.02] [--retries 1] [--cpu] [--also "OVERRIDES"]... [overrides...]``

``--also`` adds a side, mmserve with more overrides, compared with the same vLLM runs as the
default side: an A/B of a setting within one run.

``--cpu`` also prints, for each run, the CPU seconds each process of the machine spent during it
(psutil; the benchmark client included), to see where each side's CPU goes (a frozen side's
processes spend none).

``--adapters N`` serves N generated LoRA adapters of the tiny Llama on both sides (vLLM's
``lora_modules``, with ``max_loras`` N) and has the client send each request to one of them at
random (its ``--lora-modules``): throughput with several adapters in use.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchmarks.idle import cpu_seconds
from benchmarks.sides import add_also_arg, add_steal_args, all_up, least_stolen, mmserve_side, steal, steal_share, vllm_side


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


def adapter_overrides(model_key: str, count: int) -> tuple[list[str], list[str]]:
    """``count`` LoRA adapters of the tiny Llama (generated, seeds 1 to ``count``, in the cache),
    as Hydra overrides serving them (vLLM's ``lora_modules``, ``max_loras``), and their names."""
    from engines.checkpoints import cache_dir, make_tiny_llama_lora

    modules = []
    for seed in range(1, count + 1):
        path = cache_dir() / "bench-adapters" / f"lora-{seed}"
        if not (path / "adapter_config.json").is_file():
            make_tiny_llama_lora(path, seed=seed)
        modules.append({"name": f"lora-{seed}", "path": str(path)})
    listed = ", ".join(f"{{name: {m['name']}, path: '{m['path']}'}}" for m in modules)
    key = f"model.{model_key}.engine_kwargs"
    return ([f"{key}.enable_lora=true", f"++{key}.max_loras={count}", f"++{key}.lora_modules=[{listed}]"],
            [m["name"] for m in modules])


def bench(base_url: str, model_id: str, tokenizer: str, concurrency: int, input_len: int,
          output_len: int, per_slot: int, cpu: bool = False, adapters: list[str] | None = None) -> dict:
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
        "--percentile-metrics", "ttft", "--metric-percentiles", "50,99",
        *(["--lora-modules", *adapters] if adapters else [])])
    before = cpu_seconds() if cpu else {}
    stolen = steal()
    r = main(args)
    out = {"tok_s": r["output_throughput"], "failed": r["failed"], "ttft_p50_ms": r["median_ttft_ms"],
           "ttft_p99_ms": r["p99_ttft_ms"], "stolen": steal_share(stolen, steal())}
    if cpu:
        out["duration_s"] = r["duration"]
        out["cpu_s"] = dict(cpu_spent(before))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_llama", help="conf/model key (default tiny_llama)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--per-slot", type=int, default=8, help="requests per client slot")
    add_steal_args(parser)
    parser.add_argument("--cpu", action="store_true", help="print each process's CPU seconds per run")
    parser.add_argument("--adapters", type=int, default=0, help="LoRA adapters in use (random per request)")
    add_also_arg(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the mmserve side")
    opts = parser.parse_args()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

    from apps.config import compose
    from engines.checkpoints import resolve_source

    lora, adapters = adapter_overrides(opts.model, opts.adapters) if opts.adapters else ([], [])
    base = [f"model=[{opts.model}]", *lora, *opts.overrides]
    model = compose(base).model[opts.model]
    tokenizer = resolve_source(model.source)
    levels = [int(c) for c in opts.concurrency.split(",")]
    configs = {"mmserve": base, **{f"mmserve {extra}": [*base, *extra.split()] for extra in opts.also}}
    sides = [vllm_side(model), *(mmserve_side(overrides, name=name) for name, overrides in configs.items())]
    runs: dict[str, dict[int, list[dict]]] = {side.name: {c: [] for c in levels} for side in sides}
    with all_up(sides):
        for i in range(opts.rounds):
            for c in levels:
                for side in sides if i % 2 == 0 else sides[::-1]:
                    with side.running() as url:
                        run = least_stolen(lambda: bench(url, model.model_id, tokenizer, c, opts.input_len,
                                                         opts.output_len, opts.per_slot, opts.cpu, adapters),
                                           opts.max_stolen, opts.retries)
                    runs[side.name][c].append(run)
            print(json.dumps({"round": i + 1, **{name: {c: r[c][-1] for c in levels}
                                                 for name, r in runs.items()}}), flush=True)
            if opts.cpu:
                print_cpu(runs, i, levels)

    for name, overrides in configs.items():
        placement = compose(overrides).model[opts.model].deployment.placement
        print(f"\n{name}: {model.model_id}{f' through {len(adapters)} adapters' if adapters else ''}, "
              f"placement {placement}, {opts.rounds} "
              f"rounds, {opts.input_len} in / {opts.output_len} out tokens, vllm bench serve "
              "(--ignore-eos), each run against the vLLM run of its round")
        table(runs["vllm"], runs[name], levels)


def print_cpu(runs: dict[str, dict[int, list[dict]]], i: int, levels: list[int]) -> None:
    """The CPU seconds of each process during each side's runs of round ``i``."""
    for name, by_level in runs.items():
        for c in levels:
            run = by_level[c][i]
            spent = run["cpu_s"]
            print(f"CPU seconds, round {i + 1}, {name}, c={c}: {sum(spent.values()):.1f} in "
                  f"{run['duration_s']:.1f} s")
            for proc, s in list(spent.items())[:CPU_LISTED]:
                print(f"  {s:7.2f}  {proc[:70]}")


def table(own: dict[int, list[dict]], ours: dict[int, list[dict]], levels: list[int]) -> None:
    """Medians over the rounds of one mmserve side against vLLM's runs."""
    width = max(22, 5 + 6 * len(own[levels[0]]))  # "0.96 (" and "0.80, " per round, less 1
    p99_width = max(27, width)
    print(f"{'c':>3} | {'vLLM tok/s':>11} | {'mmserve tok/s':>13} | {'ratio, median (rounds)':<{width}} | "
          f"{'TTFT p50 +ms':>12} | {'TTFT p99 x, median (rounds)':<{p99_width}} | {'stolen':>11} | "
          f"{'runs again':>10} | failed")
    for c in levels:
        pairs = list(zip(ours[c], own[c]))
        ratios = [o["tok_s"] / v["tok_s"] for o, v in pairs]
        ttft = statistics.median(o["ttft_p50_ms"] - v["ttft_p50_ms"] for o, v in pairs)
        p99s = [o["ttft_p99_ms"] / v["ttft_p99_ms"] for o, v in pairs]
        p99 = f"{statistics.median(p99s):.2f} ({', '.join(f'{r:.2f}' for r in p99s)})"
        stolen = (f"{100 * statistics.median(v['stolen'] for v in own[c]):.1f}/"
                  f"{100 * statistics.median(o['stolen'] for o in ours[c]):.1f}%")
        ratio = f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})"
        again = f"{sum(v['attempts'] - 1 for v in own[c])}/{sum(o['attempts'] - 1 for o in ours[c])}"
        print(f"{c:>3} | {statistics.median(v['tok_s'] for v in own[c]):>11,.0f} | "
              f"{statistics.median(o['tok_s'] for o in ours[c]):>13,.0f} | {ratio:<{width}} | "
              f"{ttft:>+12.1f} | {p99:<{p99_width}} | {stolen:>11} | {again:>10} | {sum(o['failed'] for o in ours[c])}")


if __name__ == "__main__":
    main()
