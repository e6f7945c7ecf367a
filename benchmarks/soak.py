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
        (2, {"model_id": "tiny-resnet", "input": jpeg}),
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
        {"model_id": "tiny-resnet", "input": {"data": media.b64(png[:200])}},      # truncated
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


async def drive(url: str, seconds: float, samples: list | None = None,
                sample_every_s: float = 60) -> Counter:
    """Mixed load for ``seconds``: a closed loop (:func:`apps.loadgen.closed_loop`) per entry
    of :func:`mixes`, with its number of workers, all at once. Returns the requests by status;
    appends (elapsed s, RSS by process) to ``samples`` every ``sample_every_s``."""
    import aiohttp

    from apps.loadgen import body_factory, closed_loop, send

    rng = random.Random(0)
    bad = bad_requests()
    start = time.monotonic()

    async def sampler():
        while time.monotonic() < start + seconds:
            await asyncio.sleep(sample_every_s)  # the sampling period
            samples.append((round(time.monotonic() - start), await asyncio.to_thread(replica_rss)))

    def call_for(body, session):
        if body != "bad":
            encode = body_factory(body)
            return lambda i: send(session, url, encode(i), stream=False)

        async def call(i):
            sample = await send(session, url, body_factory(rng.choice(bad))(i), stream=False)
            await asyncio.sleep(0.2)  # pacing the invalid traffic
            return sample
        return call

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        loops = [closed_loop(call_for(body, session), concurrency=n, duration_s=seconds) for n, body in mixes()]
        if samples is not None:
            loops.append(sampler())
        done = await asyncio.gather(*loops)
    return Counter(s.status for measured, _ in done[:len(mixes())] for s in measured)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=60, help="seconds before the first RSS reading")
    ap.add_argument("--sample-every", type=float, default=60, help="seconds between RSS samples")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()

    from apps.config import compose
    from apps.serving import served

    cfg = compose([MODELS, PIPELINES, f"server.port={PORT}", *args.overrides])
    samples: list = []
    with served(cfg, app_name="soak", logging_level="ERROR", log_to_driver=False) as app:
        url = f"{app.url}/v1/infer"
        asyncio.run(drive(url, args.warmup))
        start = replica_rss()
        t0 = time.monotonic()
        statuses = asyncio.run(drive(url, args.minutes * 60, samples, args.sample_every))
        elapsed = time.monotonic() - t0
        end = replica_rss()

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
