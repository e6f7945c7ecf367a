"""Soak: mixed load through every pipeline for a while; requests, errors by status, and the
resident memory of every replica (and vLLM process) after warm-up and at the end.

``python -m benchmarks.soak [--minutes 10]``. Not a CI test. Growth above 10% is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter

PORT = 8031
MODELS = "model=[echo,echo_remote,tiny_llama,silero_vad,tiny_asr,tiny_resnet,tiny_video]"
PIPELINES = "pipeline=[echo,text,vad,asr,vision,video]"


def mixes() -> list[tuple[int, object]]:
    """(workers, body) of every pipeline, plus one worker sending invalid requests ("bad")."""
    from tests import media

    wav = {"data": media.b64(media.encode_audio(media.clip_with_speech()))}
    jpeg = {"data": media.b64(media.encode_image(media.image(320, 240), "jpeg"))}
    mp4 = {"data": media.b64(media.encode_video())}
    return [
        (3, {"model_id": "echo", "input": {"text": "hello", "n": [1, 2, 3]}}),
        (2, {"model_id": "echo-remote", "input": "hi", "params": {"delay_s": 0.01}}),
        (2, {"model_id": "tiny-llama", "prompt": "Tell me a story", "params": {"max_tokens": 32}}),
        (1, {"model_id": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
             "params": {"max_tokens": 32}}),
        (1, {"model_id": "silero-vad", "input": wav}),
        (1, {"model_id": "tiny-asr", "input": wav}),
        (2, {"model_id": "tiny-resnet18", "input": jpeg}),
        (1, {"model_id": "tiny-video", "input": mp4, "params": {"num_frames": 4}}),
        (1, "bad"),  # invalid requests of several kinds
    ]


def bad_requests() -> list[dict]:
    from tests import media

    png = media.encode_image(media.image(), "png")
    return [
        {"model_id": "ghost", "input": 1},
        {"model_id": "tiny-llama", "prompt": "x", "params": {"temperature": 9}},
        {"model_id": "echo", "input": 1, "params": {"nope": 1}},
        {"model_id": "tiny-llama", "prompt": "x" * 20000},
        {"model_id": "tiny-asr", "input": {"data": media.b64(png)}},                # an image for audio
        {"model_id": "tiny-resnet18", "input": {"data": media.b64(png[:200])}},      # truncated
        {"model_id": "tiny-video", "input": {"data": media.b64(b"junk" * 100)}},     # corrupt
    ]


def replica_rss() -> dict[str, int]:
    """RSS in bytes of every Serve replica, proxy and vLLM process on this machine, by
    "<kind> (pid N)" where kind is the title's first word up to any method name (Ray retitles
    an actor's process with the method it is running)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith(("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController")) or "VLLM::" in title:
            kind = title.split()[0].split(".")[0] if title.startswith("ray::Serve") else title.split()[0]
            out[f"{kind} (pid {p.info['pid']})"] = p.info["memory_info"].rss
    return out


async def drive(url: str, seconds: float, statuses: Counter, samples: list | None = None,
                sample_every_s: float = 60) -> None:
    """Closed-loop mixed load for ``seconds``; appends (elapsed s, RSS by process) to ``samples``."""
    import aiohttp

    rng = random.Random(0)
    bad = bad_requests()
    start = time.monotonic()
    end = start + seconds

    async def sampler():
        while time.monotonic() < end:
            await asyncio.sleep(sample_every_s)  # the sampling period
            samples.append((round(time.monotonic() - start), await asyncio.to_thread(replica_rss)))

    async def worker(body, session):
        while time.monotonic() < end:
            b = rng.choice(bad) if body == "bad" else body
            try:
                async with session.post(url, json=b) as r:
                    await r.read()
                    statuses[str(r.status)] += 1
            except Exception as err:  # counted, not fatal
                statuses[type(err).__name__] += 1
            if body == "bad":
                await asyncio.sleep(0.2)  # pacing the invalid traffic

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks = [worker(body, session) for n, body in mixes() for _ in range(n)]
        if samples is not None:
            tasks.append(sampler())
        await asyncio.gather(*tasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=60, help="seconds before the first RSS reading")
    ap.add_argument("--sample-every", type=float, default=60, help="seconds between RSS samples")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()

    import ray
    from ray import serve

    from apps.config import compose
    from apps.serving import init_local_ray
    from pipelines.builder import build_app

    cfg = compose([MODELS, PIPELINES, *args.overrides])
    init_local_ray(cfg.server, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(cfg), name="soak", route_prefix="/")
    url = f"http://127.0.0.1:{PORT}/v1/infer"
    statuses: Counter = Counter()
    samples: list = []
    try:
        asyncio.run(drive(url, args.warmup, Counter()))
        start = replica_rss()
        t0 = time.monotonic()
        asyncio.run(drive(url, args.minutes * 60, statuses, samples, args.sample_every))
        elapsed = time.monotonic() - t0
        end = replica_rss()
    finally:
        serve.shutdown()
        ray.shutdown()

    total = sum(statuses.values())
    print(json.dumps({"seconds": round(elapsed), "requests": total, "by_status": dict(statuses)}))
    print(f"{'process':60} {'start MiB':>10} {'end MiB':>10} {'growth':>8}")
    for name in sorted(start):
        if name in end:
            a, b = start[name] / 2**20, end[name] / 2**20
            flag = "  <-- over 10%" if b > a * 1.10 else ""
            print(f"{name:60} {a:10.1f} {b:10.1f} {(b - a) / a:8.1%}{flag}")
    for name in sorted(start):
        series = [f"{t}s {rss[name] / 2**20:.0f}" for t, rss in samples if name in rss]
        print(f"{name}: MiB over time: {', '.join(series)}")


if __name__ == "__main__":
    main()
