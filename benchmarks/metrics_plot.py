"""What ``GET /metrics`` shows while a model's engine dies and comes back: a plot for the docs.

Serves echo and the tiny Llama (its engine in its own deployment), drives both with a closed
loop, kills the tiny Llama's vLLM engine core after ``--kill-at`` seconds, scrapes ``/metrics``
every second until the model has been ready again for a while, and plots from the scrapes alone:
responses/s by model and status code, the model's status, and vLLM's running requests.

``python -m benchmarks.metrics_plot [--out docs/metrics-engine-kill.png]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

LLM, ECHO = "tiny-llama", "echo"


async def closed_loop(url: str, body: dict, concurrency: int, stop: asyncio.Event) -> None:
    import httpx

    async def worker(client):
        while not stop.is_set():
            try:
                r = await client.post(url, json=body)
                if r.status_code == 503:  # as a client honouring Retry-After would, but faster
                    await asyncio.sleep(0.5)
            except httpx.HTTPError:
                await asyncio.sleep(0.5)

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


async def run(base: str, args) -> list[tuple[float, list]]:
    import httpx

    from tests.support import engine_core_processes, metric_families

    stop = asyncio.Event()
    loads = [asyncio.create_task(closed_loop(f"{base}/v1/infer", body, 2, stop)) for body in (
        {"model_id": ECHO, "input": "hello", "params": {"delay_s": 0.05}},
        {"model_id": LLM, "prompt": "Once upon a time", "params": {"max_tokens": 32, "temperature": 0}})]
    scrapes: list[tuple[float, list]] = []
    start = time.monotonic()
    killed = recovered = None
    seen_down = False
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            t = time.monotonic() - start
            families = metric_families(await client.get(f"{base}/metrics"))
            scrapes.append((t, families))
            status = {s.labels["status"] for f in families if f.name == "mmserve_model_status"
                      for s in f.samples if s.labels["model_id"] == LLM and s.value == 1}
            seen_down = seen_down or (killed is not None and status != {"ready"})
            if killed is None and t >= args.kill_at:
                cores = engine_core_processes(LLM)  # a /proc read can miss a process: looked for each second
                if not cores and t > args.kill_at + 10:
                    raise RuntimeError(f"no vLLM engine core process of {LLM} found")
                for p in cores:
                    p.kill()
                if cores:
                    killed = t
                    print(json.dumps({"killed_at_s": round(t, 1)}), flush=True)
            elif killed is not None and recovered is None and status == {"ready"} and seen_down:
                recovered = t
                print(json.dumps({"ready_again_at_s": round(t, 1)}), flush=True)
            if (recovered is not None and t > recovered + args.tail) or t > args.max_s:
                break
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - start - t)))
    stop.set()
    await asyncio.gather(*loads)
    return scrapes


def plot(scrapes: list[tuple[float, list]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.metrics import sample_value

    times = [t for t, _ in scrapes]

    def series(sample, **labels):
        return [sample_value(f, sample, **labels) for _, f in scrapes]

    def rate(values):
        return [max(0.0, (b - a) / (t1 - t0)) for a, b, t0, t1 in zip(values, values[1:], times, times[1:])]

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1.5]})
    for model, code, style in [(ECHO, "200", "-"), (LLM, "200", "-"), (LLM, "503", "--")]:
        axes[0].plot(times[1:], rate(series("mmserve_requests_total", model_id=model, code=code, route="/v1/infer")),
                     style, label=f"{model} {code}")
    axes[0].set_ylabel("responses/s")
    axes[0].legend(loc="upper right")
    axes[0].set_title("mmserve_requests_total while tiny-llama's vLLM engine core is killed")
    for status in ("ready", "recovering", "unavailable", "unhealthy", "starting"):
        axes[1].plot(times, series("mmserve_model_status", model_id=LLM, status=status), label=status,
                     drawstyle="steps-post")
    axes[1].set_ylabel("status")
    axes[1].legend(loc="center right", ncol=5, fontsize="small")
    axes[2].plot(times, series("vllm:num_requests_running", model_id=LLM), label="vllm:num_requests_running")
    axes[2].plot(times, series("mmserve_requests_in_flight", model_id=LLM), label="mmserve_requests_in_flight")
    axes[2].set_ylabel(LLM)
    axes[2].set_xlabel("seconds (one scrape of GET /metrics per second)")
    axes[2].legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(json.dumps({"plot": out, "scrapes": len(scrapes)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/metrics-engine-kill.png")
    ap.add_argument("--kill-at", type=float, default=10.0, help="seconds of load before the kill")
    ap.add_argument("--tail", type=float, default=10.0, help="seconds to go on once it is ready again")
    ap.add_argument("--max-s", type=float, default=300.0, help="give up after this many seconds")
    args = ap.parse_args()

    from apps.config import compose
    from apps.serving import free_port, served

    cfg = compose(["model=[echo,tiny_llama]", "pipeline=[echo,text]", f"server.port={free_port()}"])
    with served(cfg, logging_level="ERROR", log_to_driver=False) as server:
        scrapes = asyncio.run(run(server.url, args))
    plot(scrapes, args.out)


if __name__ == "__main__":
    main()
