"""Time to first token of requests that arrive at once: mmserve's default config against vLLM's
own OpenAI server on the same model and engine arguments.

Where ``vllm bench serve`` at concurrency 32 finds mmserve's TTFT p99 above vLLM's own, the slow
first tokens are those of the run's first 32 requests, which arrive together; later requests,
arriving one at a time as others finish, get theirs sooner than on vLLM's server. This measures
that case alone: bursts of ``-c`` streamed ``/v1/completions`` sent at once (greedy,
``ignore_eos``, ``--max-tokens`` tokens, distinct prompts), one burst after the other, after a
warm-up; each request's TTFT is the time to its first event. Each burst opens connections of
its own, as ``vllm bench serve`` does for its first requests (it starts a new client session per
run); ``--keep-connections`` sends every burst over the connections the warm-up opened instead.
Both servers stay up, each frozen while the other is measured (``benchmarks.sides``); rounds go
vllm, mmserve, then mmserve, vllm, ...; a round's figures are the medians over its bursts of each
burst's median and slowest TTFT.

``--beside-ray`` adds a third case: vLLM's own server measured while an idle local Ray Serve
(the echo model, Ray's processes on the last CPU as mmserve's default puts them beside a vLLM
CPU worker) runs next to it, thawed with it. What that costs vLLM's own bursts is what Ray's
presence alone costs, before mmserve does anything.

``--also "OVERRIDES"`` adds a side, mmserve with more Hydra overrides, measured in the same
rounds: an A/B of a setting within one run.

``python -m benchmarks.ttft_burst [--model tiny_llama] [-c 32] [--bursts 8] [--max-tokens 32]
[--rounds 1] [--keep-connections] [--beside-ray] [--also "OVERRIDES"]... [overrides...]``
(overrides: Hydra overrides for the mmserve side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time

import httpx

from benchmarks.sides import add_also_arg, all_up, mmserve_side, vllm_side


async def first_token_s(client: httpx.AsyncClient, url: str, model_id: str, prompt: str,
                        max_tokens: int) -> float:
    """Seconds from sending one streamed completion to its first event (read to its end)."""
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{url}: a stream without events")
    return first


async def bursts(url: str, model_id: str, c: int, n: int, max_tokens: int,
                 keep_connections: bool = False) -> dict:
    """``n`` bursts of ``c`` requests at once after a warm-up, each burst on new connections
    unless ``keep_connections``; TTFT figures in ms."""
    limits = httpx.Limits(max_connections=2 * c)

    async def burst(client: httpx.AsyncClient, k: int) -> list[float]:
        return sorted(await asyncio.gather(*(
            first_token_s(client, url, model_id, f"Request {k}-{i}: tell me more. " * 4, max_tokens)
            for i in range(c))))

    async with httpx.AsyncClient(timeout=120, limits=limits) as warm:
        await burst(warm, -1)  # warm-up
        runs = []
        for k in range(n):
            if keep_connections:
                runs.append(await burst(warm, k))
            else:
                async with httpx.AsyncClient(timeout=120, limits=limits) as fresh:
                    runs.append(await burst(fresh, k))
    return {"ttft_median_ms": 1000 * statistics.median(r[len(r) // 2] for r in runs),
            "ttft_max_ms": 1000 * statistics.median(r[-1] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_llama", help="conf/model key (default tiny_llama)")
    parser.add_argument("-c", type=int, default=32, help="requests per burst (default 32)")
    parser.add_argument("--bursts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep-connections", action="store_true",
                        help="send every burst over the warm-up's connections (default: new ones per burst)")
    parser.add_argument("--beside-ray", action="store_true",
                        help="also measure vLLM's own server beside an idle local Ray Serve")
    add_also_arg(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the mmserve side")
    opts = parser.parse_args()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

    from apps.config import compose
    from core import cpus

    base = [f"model=[{opts.model}]", *opts.overrides]
    model = compose(base).model[opts.model]
    args = (model.model_id, opts.c, opts.bursts, opts.max_tokens, opts.keep_connections)
    vllm, mmserve = vllm_side(model), mmserve_side(base)
    cases = {"vllm": [vllm], "mmserve": [mmserve]}  # the sides thawed for each case, its server last
    for extra in opts.also:
        cases[f"mmserve {extra}"] = [mmserve_side([*base, *extra.split()], name=f"mmserve {extra}")]
    sides = [side for case in cases.values() for side in case]
    if opts.beside_ray:
        ray = mmserve_side(["model=[echo]", f"server.ray_cpus=[{max(cpus.allowed())}]"], name="idle Ray")
        cases["vllm beside Ray"] = [ray, vllm]
        sides.append(ray)
    rounds = []
    with all_up(sides):
        for i in range(opts.rounds):
            rounds.append({})
            for name in cases if i % 2 == 0 else reversed(cases):
                with contextlib.ExitStack() as thawed:
                    url = [thawed.enter_context(side.running()) for side in cases[name]][-1]
                    rounds[-1][name] = asyncio.run(bursts(url, *args))
            print(json.dumps({"round": i + 1, **rounds[-1]}), flush=True)

    connections = "over the warm-up's connections" if opts.keep_connections else "each on new connections"
    print(f"\n{model.model_id}, placement {model.deployment.placement}, {opts.rounds} round(s) of "
          f"{opts.bursts} bursts of {opts.c} streamed completions ({opts.max_tokens} tokens), {connections}")
    width = max(15, *(len(name) for name in cases))
    print(f"{'':>{width}} | {'TTFT median ms':>14} | {'TTFT slowest ms':>15} | slowest over vLLM's alone, same round")
    for name in cases:
        runs = [r[name] for r in rounds]
        ratios = [r[name]["ttft_max_ms"] / r["vllm"]["ttft_max_ms"] for r in rounds]
        versus = "" if name == "vllm" else (f"{statistics.median(ratios):.2f} "
                                            f"({', '.join(f'{x:.2f}' for x in ratios)})")
        print(f"{name:>{width}} | {statistics.median(r['ttft_median_ms'] for r in runs):>14.0f} | "
              f"{statistics.median(r['ttft_max_ms'] for r in runs):>15.0f} | {versus}")


if __name__ == "__main__":
    main()
