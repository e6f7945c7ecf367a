"""Resident memory of a process that decodes media in worker threads, per allocator, in one run.

The ingress decodes uploads in ``asyncio.to_thread``'s pool (6 threads on 2 cores). This runs
the same preprocess nodes (``nodes.vision``, ``nodes.audio``, ``nodes.video``) on the same kind
of inputs the soak sends, from a pool of ``--threads``, for ``--seconds`` per side, each side in a
fresh process:

- ``glibc``: the system malloc as it comes;
- ``glibc tuned``: ``MALLOC_ARENA_MAX=2`` and a fixed ``MALLOC_MMAP_THRESHOLD_`` of 64 KiB;
- ``jemalloc``: the copy Ray ships, through ``LD_PRELOAD`` (``ray_actor_options.jemalloc``).

It prints RSS after the first 15 s and at the end, and decodes per second.
``python -m benchmarks.decode_memory [--kinds audio,video] [--seconds 60] [--threads 6]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WARMUP_S = 15.0


def sides() -> dict[str, dict[str, str]]:
    from core.config import ray_jemalloc

    return {"glibc": {},
            "glibc tuned": {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536"},
            "jemalloc": {"LD_PRELOAD": ray_jemalloc() or ""}}


def decoder(kind: str):
    """A no-argument call that decodes one input the way the node does for a request."""
    import asyncio

    from core.config import ModelConfig
    from tests.media import encode_audio, encode_image, encode_video, image, speechlike

    if kind == "image":
        from nodes.vision import ImageDecode
        node = ImageDecode({}, ModelConfig(model_id="m", modality="vision", pipeline="vision"))
        data = encode_image(image(320, 240), "jpeg")
        call = lambda: node.decode(data, "m")  # noqa: E731
    elif kind == "audio":
        from nodes.audio import AudioDecode
        node = AudioDecode({}, ModelConfig(model_id="m", modality="audio", pipeline="asr"))
        data = encode_audio(speechlike(4.0), "wav")
        call = lambda: node.decode(data, "m")  # noqa: E731
    elif kind == "video":
        from nodes.video import VideoFrames
        node = VideoFrames({}, ModelConfig(model_id="m", modality="video", pipeline="video"))
        data = encode_video(frames=20, fps=10, size=64)
        call = lambda: node.decode(data, None, 4, "m")  # noqa: E731
    else:
        raise SystemExit(f"unknown kind {kind!r}: image, audio or video")
    asyncio.run(node.start())
    return call


def measure(kind: str, seconds: float, threads: int) -> dict:
    """Run in this process: decode in a pool until ``seconds`` pass; RSS in MiB."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    call, proc = decoder(kind), psutil.Process()
    n, t0, start, start_n = 0, time.monotonic(), None, 0
    with ThreadPoolExecutor(threads) as pool:
        while time.monotonic() - t0 < seconds:
            list(pool.map(lambda _: call(), range(4 * threads)))
            n += 4 * threads
            if start is None and time.monotonic() - t0 >= WARMUP_S:
                start, start_n, t_start = proc.memory_info().rss / 2**20, n, time.monotonic()
    end = proc.memory_info().rss / 2**20
    decodes = n - start_n
    return {"rss_start_mib": start, "rss_end_mib": end, "decodes": decodes,
            "kib_per_decode": 1024 * (end - start) / max(decodes, 1),
            "decodes_per_s": decodes / (time.monotonic() - t_start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kinds", default="audio,video")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seconds <= WARMUP_S:
        ap.error(f"--seconds must be more than the {WARMUP_S:g} s before RSS is first read")
    if args.child:  # one side, in its own process
        print(json.dumps(measure(args.child, args.seconds, args.threads)), flush=True)
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"RSS while decoding in {args.threads} threads, {args.seconds:g} s per side "
                        f"(from {WARMUP_S:g} s on), {os.cpu_count()} CPUs")
    for col in ("kind", "allocator", "RSS MiB at 15 s", "RSS MiB at end", "decodes", "KiB per decode",
                "decodes/s"):
        table.add_column(col)
    for kind in args.kinds.split(","):
        for name, env in sides().items():
            out = subprocess.run([sys.executable, "-m", "benchmarks.decode_memory", "--child", kind,
                                  "--seconds", str(args.seconds), "--threads", str(args.threads)],
                                 env={**os.environ, **env}, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"kind": kind, "allocator": name, **r}), flush=True)
            table.add_row(kind, name, f"{r['rss_start_mib']:.0f}", f"{r['rss_end_mib']:.0f}", str(r["decodes"]),
                          f"{r['kib_per_decode']:.1f}", f"{r['decodes_per_s']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
