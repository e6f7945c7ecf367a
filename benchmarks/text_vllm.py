"""Text generation through mmserve vs vLLM's own AsyncLLM in-process, same model and load.

For each concurrency (1, 8, 32 by default), a closed loop of streamed requests with the same
prompts and sampling parameters (greedy, so both sides generate the same tokens):

- ``vllm``: AsyncLLM driven directly in this process (the ceiling), before and after the
  served sides, which are compared with the mean of the two;
- ``mmserve <placement>``: ``POST /v1/infer`` with ``stream: true`` through the full text
  pipeline (ingress → text_prompt → vLLM engine → result) on Ray Serve, with the engine in its
  own deployment (``engine``) and in the ingress replica (``inline``).

The direct engine is shut down before Ray starts, so the two never share the 2 cores.
``python -m benchmarks.text_vllm [--model tiny_llama] [--concurrency 1,8,32] [overrides...]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics

PORT = 8021
PROMPT_WORDS = ("serving models at scale needs batching streaming routing and clear errors "
                "so that many users can share one machine without waiting too long").split()


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts of about 32 tokens."""
    return [" ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(20)) + f" {i}" for i in range(n)]


def requests_for(concurrency: int) -> int:
    """Enough requests per level that one run's ratios move by a few percent, not 15."""
    return max(32, 8 * concurrency)


async def run_direct(model, levels, max_tokens):
    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from apps.loadgen import closed_loop_text
    from engines.checkpoints import resolve_source
    from engines.vllm import VLLMKwargs

    source = resolve_source(model.source)
    kwargs = VLLMKwargs.model_validate(model.engine_kwargs)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=source, **kwargs.engine_args(current_platform.is_cpu())))
    tok = AutoTokenizer.from_pretrained(source)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, output_kind=RequestOutputKind.DELTA)
    rows = []
    try:
        for c in [1] + levels:  # the first pass warms up
            n = requests_for(c)
            ids = [tok.encode(p) for p in prompts(n)]

            async def call(i, ids=ids, c=c):
                import time
                t0 = time.perf_counter()
                ttft, tokens = None, 0
                async for out in llm.generate({"prompt_token_ids": ids[i]}, sp, f"bench-{c}-{i}-{len(rows)}"):
                    if ttft is None and out.outputs[0].text:
                        ttft = time.perf_counter() - t0
                    tokens += len(out.outputs[0].token_ids)
                return ttft, time.perf_counter() - t0, tokens

            res = await closed_loop_text(call, n, c)
            rows.append(("vllm", res))
    finally:
        llm.shutdown()
    return rows[1:]


def run_mmserve(cfg, levels, max_tokens, placements):
    import ray
    from ray import serve

    from apps.serving import init_local_ray
    from pipelines.builder import build_app

    init_local_ray(cfg.server, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    rows = []
    try:
        for placement in placements:
            placed = cfg.model_copy(deep=True)
            for m in placed.model.values():
                m.deployment.placement = placement
            serve.run(build_app(placed), name="bench", route_prefix="/")
            side = f"mmserve {placement}"
            rows += [(side, r) for r in drive_http(placed, levels, max_tokens, PORT)]
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def drive_http(cfg, levels, max_tokens, port):
    import aiohttp

    from apps.loadgen import closed_loop_text, stream_infer

    model = next(iter(cfg.model.values()))
    url = f"http://127.0.0.1:{port}/v1/infer"
    rows = []

    async def drive():
        conn = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
            for c in [1] + levels:
                texts = prompts(requests_for(c))

                async def call(i, texts=texts):
                    return await stream_infer(s, url, {"model_id": model.model_id, "prompt": texts[i],
                                                       "params": {"max_tokens": max_tokens, "temperature": 0}})

                rows.append(await closed_loop_text(call, len(texts), c))

    asyncio.run(drive())
    return rows[1:]  # the first pass warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny_llama", help="a conf/model file")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--placements", default="engine,inline", help="mmserve placements to measure")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from apps.config import compose

    cfg = compose([f"model=[{args.model}]", *args.overrides])
    model = next(iter(cfg.model.values()))
    # vLLM's own figures move between runs on a shared machine more than ours do: measure them
    # before and after the served sides and compare with their mean.
    rows = [("vllm before", r) for _, r in asyncio.run(run_direct(model, levels, args.max_tokens))]
    gc.collect()
    rows += run_mmserve(cfg, levels, args.max_tokens, args.placements.split(","))
    rows += [("vllm after", r) for _, r in asyncio.run(run_direct(model, levels, args.max_tokens))]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.model_id}: streamed, greedy, {args.max_tokens} max tokens, "
                        f"{os.cpu_count()} CPUs, client on the same machine, "
                        f"http_proxy {cfg.server.http_proxy}")
    for col in ("concurrency", "side", "requests", "out tok/s", "vs vllm", "TTFT p50 ms", "TTFT p50 over vllm",
                "TTFT p99 ms", "TPOT p50 ms", "errors"):
        table.add_column(col)
    for c in levels:
        level = [(side, r) for side, r in rows if r.concurrency == c]
        direct = [r for side, r in level if side.startswith("vllm")]
        tok_s = statistics.mean(r.output_tok_s for r in direct)
        ttft = statistics.mean(r.ttft_p50_ms for r in direct)
        for side, r in level:
            table.add_row(str(c), side, str(r.requests), f"{r.output_tok_s:.0f}", f"{r.output_tok_s / tok_s:.2f}",
                          f"{r.ttft_p50_ms:.1f}", f"{r.ttft_p50_ms - ttft:+.1f}", f"{r.ttft_p99_ms:.1f}",
                          f"{r.tpot_p50_ms:.2f}", str(r.errors))
        print(json.dumps({"concurrency": c, "vllm_tok_s": tok_s, "vllm_ttft_p50_ms": ttft,
                          "sides": [{"side": side, **r.as_dict()} for side, r in level]}), flush=True)
    Console().print(table)


if __name__ == "__main__":
    main()
