"""Text generation through mmserve vs vLLM's own AsyncLLM in-process, same model and load.

For each concurrency (1, 8, 32 by default), a closed loop of streamed requests with the same
prompts and sampling parameters (greedy, so both sides generate the same tokens):

- ``vllm``: AsyncLLM driven directly in this process (the ceiling), before and after each
  round of served sides, each of which is compared with the mean of its two neighbours;
- ``mmserve <placement>``: ``POST /v1/infer`` with ``stream: true`` through the full text
  pipeline (ingress → text_prompt → vLLM engine → result) on Ray Serve, with the engine in its
  own deployment (``engine``) and in the ingress replica (``inline``).

The direct engine is shut down before Ray starts, so the two never share the 2 cores. With
``--rounds N`` the sequence is vllm, served, vllm, served, ..., vllm and each served side is
summed up by the median of its N ratios: on a shared machine vLLM's own figure moves by 20-30%
from one run to the next, and one pair of runs can land on either side of a target.
``python -m benchmarks.text_vllm [--model tiny_llama] [--concurrency 1,8,32] [--rounds 3] [overrides...]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apps.loadgen import LoadResult

PORT = 8021
PROMPT_WORDS = ("serving models at scale needs batching streaming routing and clear errors "
                "so that many users can share one machine without waiting too long").split()


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts of about 32 tokens."""
    return [" ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(20)) + f" {i}" for i in range(n)]


def requests_for(concurrency: int) -> int:
    """Enough requests per level that one run's ratios move by a few percent, not 15."""
    return max(32, 8 * concurrency)


async def run_direct(model, levels, max_tokens) -> dict[int, LoadResult]:
    """vLLM's AsyncLLM in this process, driven by the load generator's closed loop at each
    concurrency of ``levels`` (after a warm-up pass at 1)."""
    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from apps.loadgen import Sample, closed_loop, summarize
    from engines.checkpoints import resolve_source
    from engines.vllm import VLLMKwargs

    source = resolve_source(model.source)
    kwargs = VLLMKwargs.model_validate(model.engine_kwargs)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=source, **kwargs.engine_args(current_platform.is_cpu())))
    tok = AutoTokenizer.from_pretrained(source)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, output_kind=RequestOutputKind.DELTA)
    rows = {}
    try:
        for n_pass, c in enumerate([1] + levels):  # the first pass warms up
            n = requests_for(c)
            ids = [tok.encode(p) for p in prompts(n)]

            async def call(i, ids=ids, tag=f"bench-{c}-{n_pass}"):
                t0 = time.perf_counter()
                ttft, tokens = None, 0
                async for out in llm.generate({"prompt_token_ids": ids[i]}, sp, f"{tag}-{i}"):
                    if ttft is None and out.outputs[0].text:
                        ttft = time.perf_counter() - t0
                    tokens += len(out.outputs[0].token_ids)
                return Sample("200", time.perf_counter() - t0, ttft, tokens)

            res = summarize(*await closed_loop(call, concurrency=c, requests=n), stream=True)
            if n_pass:
                rows[c] = res
    finally:
        llm.shutdown()
    return rows


def run_mmserve(cfg, levels, max_tokens, placements) -> list[tuple[str, dict[int, LoadResult]]]:
    """(side, results by concurrency) of each placement, served one after the other on one Ray."""
    from apps.serving import ray_serve, served

    rows = []
    with ray_serve(cfg.server, logging_level="ERROR", log_to_driver=False) as session:
        for placement in placements:
            placed = cfg.model_copy(deep=True)
            for m in placed.model.values():
                m.deployment.placement = placement
            with served(placed, session=session, app_name="bench") as app:
                rows.append((f"mmserve {placement}", drive_http(placed, levels, max_tokens, f"{app.url}/v1/infer")))
    return rows


def drive_http(cfg, levels, max_tokens, url) -> dict[int, LoadResult]:
    """Streamed ``POST /v1/infer`` with the same prompts, closed loop at each concurrency of
    ``levels`` (after a warm-up pass at 1)."""
    from apps.loadgen import run_load

    model = next(iter(cfg.model.values()))
    rows = {}
    for n_pass, c in enumerate([1] + levels):
        texts = prompts(requests_for(c))
        res = asyncio.run(run_load(
            url, lambda i, texts=texts: {"model_id": model.model_id, "prompt": texts[i],
                                         "params": {"max_tokens": max_tokens, "temperature": 0}},
            concurrency=c, duration_s=None, warmup_s=0, requests=len(texts), stream=True, timeout_s=600))
        if n_pass:  # the first pass warms up
            rows[c] = res
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny_llama", help="a conf/model file")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--placements", default="engine,inline", help="mmserve placements to measure")
    ap.add_argument("--rounds", type=int, default=3, help="served rounds, each between two runs of vLLM's own")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from apps.config import compose

    cfg = compose([f"model=[{args.model}]", f"server.port={PORT}", *args.overrides])
    model = next(iter(cfg.model.values()))

    def direct():
        rows = asyncio.run(run_direct(model, levels, args.max_tokens))
        gc.collect()
        return rows

    # directs[k]: vLLM's own results by concurrency; runs: (round, side, results by concurrency),
    # round k's served sides sitting between direct runs k and k+1
    directs = [direct()]
    runs = []
    for k in range(args.rounds):
        runs += [(k, side, by_c) for side, by_c in run_mmserve(cfg, levels, args.max_tokens, args.placements.split(","))]
        directs.append(direct())
    report(cfg, model, args, levels, directs, runs)


def report(cfg, model, args, levels, directs, runs) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.model_id}: streamed, greedy, {args.max_tokens} max tokens, "
                        f"{os.cpu_count()} CPUs, client on the same machine, "
                        f"http_proxy {cfg.server.http_proxy}, {args.rounds} round(s)")
    for col in ("concurrency", "round", "side", "out tok/s", "vs vllm", "TTFT p50 ms", "TTFT p50 over vllm",
                "TTFT p99 ms", "TPOT p50 ms", "errors"):
        table.add_column(col)
    for c in levels:
        at = [d[c] for d in directs]
        sides: dict[str, list[dict]] = {}
        for k in range(args.rounds):
            ref_tok_s = statistics.mean(r.output_tok_s for r in at[k:k + 2])
            ref_ttft = statistics.mean(r.ttft_p50_ms for r in at[k:k + 2])
            level = [("vllm", at[k])] + [(side, by_c[c]) for kk, side, by_c in runs if kk == k]
            if k == args.rounds - 1:
                level.append(("vllm", at[k + 1]))
            for side, r in level:
                table.add_row(str(c), str(k + 1), side, f"{r.output_tok_s:.0f}", f"{r.output_tok_s / ref_tok_s:.2f}",
                              f"{r.ttft_p50_ms:.1f}", f"{r.ttft_p50_ms - ref_ttft:+.1f}", f"{r.ttft_p99_ms:.1f}",
                              f"{r.tpot_p50_ms:.2f}", str(r.errors))
                if side != "vllm":
                    sides.setdefault(side, []).append({**r.as_dict(), "round": k + 1,
                                                       "vs_vllm": r.output_tok_s / ref_tok_s,
                                                       "ttft_p50_over_vllm_ms": r.ttft_p50_ms - ref_ttft})
        summary = {side: {"vs_vllm_median": statistics.median(x["vs_vllm"] for x in xs),
                          "ttft_p50_over_vllm_ms_median": statistics.median(x["ttft_p50_over_vllm_ms"] for x in xs)}
                   for side, xs in sides.items()}
        print(json.dumps({"concurrency": c, "vllm": [r.as_dict() for r in at], "sides": sides,
                          "summary": summary}), flush=True)
        for side, m in summary.items():
            table.add_row(str(c), "median", side, "", f"{m['vs_vllm_median']:.2f}", "",
                          f"{m['ttft_p50_over_vllm_ms_median']:+.1f}", "", "", "")
    Console().print(table)


if __name__ == "__main__":
    main()
