"""Speech to text: mmserve's Whisper pipeline against vLLM's own OpenAI server on the same model.

Each round serves the same model with the same engine arguments twice, one after the other:
vLLM's server (``python -m vllm.entrypoints.launchers.api_server.entry``, what ``vllm serve`` runs),
then mmserve (``apps.serving.served`` of ``model=[<model>]`` and any overrides). One client
posts the same 4 s, 16 kHz WAV to ``/v1/audio/transcriptions`` of each (``language=en``,
``response_format=json``, ``temperature=0``, ``max_completion_tokens`` 32), closed loop at
concurrency ``-c``, and reports transcriptions/s and latency; a round's ratio compares mmserve
with the vLLM run before it, and the summary is the median over rounds.

vLLM's server decodes uploads with ``soundfile`` (its ``audio`` extra), which the locked stack
does not have: the script installs it into ``--soundfile-dir`` with pip (PyPI) and puts that
directory on the vLLM server's ``PYTHONPATH`` only. vLLM's own benchmark client (``vllm bench
serve``) reads speech from hub datasets only, so it cannot run offline; the client here is a
plain ``httpx`` loop, the same for both sides.

``python -m benchmarks.speech [--model tiny_whisper] [-c 8] [--requests 64] [--rounds 3] [overrides...]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

FORM = {"language": "en", "response_format": "json", "temperature": "0", "max_completion_tokens": "32"}


def soundfile_dir(path: Path) -> Path:
    """A directory holding ``soundfile`` for vLLM's server, installed there if missing."""
    if not (path / "soundfile.py").exists():
        print(f"installing soundfile into {path} for vLLM's server", flush=True)
        uv = Path(__file__).resolve().parent.parent / "scripts" / "uv.sh"  # the venv has no pip
        subprocess.run(["bash", str(uv), "pip", "install", "-q", "--no-deps", "--python", sys.executable,
                        "--target", str(path), "soundfile"], check=True)
    return path


async def load(url: str, model_id: str, wav: bytes, concurrency: int, requests: int) -> dict:
    """``requests`` transcriptions, ``concurrency`` at a time; throughput, latency, failures."""
    latencies: list[float] = []
    failed = 0
    todo = iter(range(requests))

    def post(client: httpx.AsyncClient):
        return client.post("/v1/audio/transcriptions", data={"model": model_id, **FORM},
                           files={"file": ("speech.wav", wav, "audio/wav")})

    async def slot(client: httpx.AsyncClient) -> None:
        nonlocal failed
        for _ in todo:
            t = time.perf_counter()
            r = await post(client)
            if r.status_code == 200 and isinstance(r.json().get("text"), str):
                latencies.append(time.perf_counter() - t)
            else:
                failed += 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        r = await post(client)  # warm-up
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request failed: {r.status_code} {r.text[:300]}")
        t0 = time.perf_counter()
        await asyncio.gather(*(slot(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"per_s": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))], "failed": failed}


def run_vllm(model, wav: bytes, opts) -> dict:
    from benchmarks.sides import vllm_server

    # vLLM's server decodes uploads with soundfile, installed beside it by this script
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(opts.soundfile_dir), os.environ.get("PYTHONPATH")]))}
    with vllm_server(model, env=env) as url:
        return asyncio.run(load(url, model.model_id, wav, opts.c, opts.requests))


def run_mmserve(cfg, model, wav: bytes, opts) -> dict:
    from apps.serving import served

    with served(cfg, log_to_driver=False) as server:
        return asyncio.run(load(server.url, model.model_id, wav, opts.c, opts.requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_whisper", help="conf/model key (default tiny_whisper)")
    parser.add_argument("-c", type=int, default=8, help="concurrency (default 8)")
    parser.add_argument("--requests", type=int, default=64, help="transcriptions per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soundfile-dir", type=Path,
                        default=Path.home() / ".cache" / "mmserve" / "bench-soundfile")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the mmserve side")
    opts = parser.parse_args()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    soundfile_dir(opts.soundfile_dir)

    from apps.config import compose
    from apps.serving import free_port
    from tests import media

    cfg = compose([f"model=[{opts.model}]", f"server.port={free_port()}", *opts.overrides])
    model = cfg.model[opts.model]
    wav = media.encode_audio(media.clip_with_speech())
    rounds = []
    for i in range(opts.rounds):
        rounds.append({"vllm": run_vllm(model, wav, opts), "mmserve": run_mmserve(cfg, model, wav, opts)})
        print(json.dumps({"round": i + 1, **rounds[-1]}), flush=True)

    own = [r["vllm"] for r in rounds]
    ours = [r["mmserve"] for r in rounds]
    print(f"\n{model.model_id}, placement {model.deployment.placement}, {opts.rounds} rounds of "
          f"{opts.requests} transcriptions of a 4 s WAV at concurrency {opts.c}")
    print(f"{'':>8} | {'per s':>6} | {'p50 ms':>7} | {'p99 ms':>7} | failed")
    for name, runs in (("vLLM", own), ("mmserve", ours)):
        print(f"{name:>8} | {statistics.median(r['per_s'] for r in runs):>6.1f} | "
              f"{statistics.median(r['p50_ms'] for r in runs):>7.0f} | "
              f"{statistics.median(r['p99_ms'] for r in runs):>7.0f} | {sum(r['failed'] for r in runs)}")
    ratio = statistics.median(o["per_s"] / v["per_s"] for o, v in zip(ours, own))
    print(f"ratio of transcriptions/s (median of rounds): {ratio:.2f}")


if __name__ == "__main__":
    main()
