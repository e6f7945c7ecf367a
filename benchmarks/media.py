"""Media throughput: /v1/infer with dynamic batching vs ``max_batch_size: 1`` vs a plain torch loop.

In one run, per modality (``vision``: the tiny resnet18 on 320x240 JPEGs; ``audio``: the tiny
wav2vec2 recognizer on 4 s WAV clips):

- ``plain``: the ceiling on this machine, no server: decode + transforms + the model, in a
  loop over batches of ``--batch`` items (the same code our nodes and engines run);
- ``batched``: the pipeline on Ray Serve (engine in its own deployment), closed loop at
  concurrency ``-c`` through HTTP, ``max_batch_size: --batch``;
- ``unbatched``: the same with ``max_batch_size: 1``.

``python -m benchmarks.media [--modality vision audio] [-c 32] [-d 20] [--batch 16]``
prints items/s and the ratios to ``plain``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

PORT = 8013
MODELS = {"vision": ("tiny_resnet", "vision"), "audio": ("tiny_asr", "asr")}


def sample(modality: str) -> tuple[bytes, str]:
    from tests import media

    if modality == "vision":
        return media.encode_image(media.image(320, 240), "jpeg"), "jpeg"
    return media.encode_audio(media.clip_with_speech(before_s=1.0, speech_s=1.5, after_s=1.5)), "wav"


def plain_loop(modality: str, data: bytes, batch: int, seconds: float, threads: int) -> float:
    """Items/s of decode + preprocess + model over batches of ``batch``, for ``seconds``."""
    import torch

    from apps.config import compose
    from core.registry import engine_class, node_class

    torch.set_num_threads(threads)
    key, pipe = MODELS[modality]
    cfg = compose([f"model=[{key}]", f"pipeline=[{pipe}]"])
    model, spec = cfg.model[key], cfg.pipeline[pipe].preprocess
    node = node_class(spec.name)(spec.kwargs, model)
    engine = engine_class(model.engine)(model)
    asyncio.run(node.start())
    engine.load()
    params = engine.Params()
    items, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        payloads = [node.decode(data, model.model_id) for _ in range(batch)]
        with torch.inference_mode():
            engine.run_batch([(p, params) for p in payloads])
        items += batch
    return items / (time.perf_counter() - t0)


def measure_served(session, modality: str, data: bytes, max_batch: int, args) -> dict:
    """Serve the modality's model into ``session`` with ``max_batch_size: max_batch``, drive
    it, and read its engine's mean batch size."""
    from ray import serve

    from apps.config import compose
    from apps.loadgen import run_load
    from apps.serving import served
    from pipelines.deployments import deployment_name, step_app_name
    from tests.media import b64

    key, pipe = MODELS[modality]
    cfg = compose([f"model=[{key}]", f"pipeline=[{pipe}]", f"server.port={PORT}",
                   f"model.{key}.engine_kwargs.max_batch_size={max_batch}",
                   f"++model.{key}.engine_kwargs.torch_threads={args.engine_threads or args.threads}",
                   f"model.{key}.deployment.engine.ray_actor_options.num_cpus=1",
                   f"model.{key}.deployment.engine.max_ongoing_requests={max(args.concurrency, max_batch)}",
                   f"model.{key}.deployment.placement={args.placement}", *args.overrides])
    model_id = cfg.model[key].model_id
    with served(cfg, session=session, app_name="bench") as app:
        body = {"model_id": model_id, "input": {"data": b64(data)}}
        res = asyncio.run(run_load(f"{app.url}/v1/infer", body, concurrency=args.concurrency,
                                   duration_s=args.duration, warmup_s=args.warmup))
        stats = (serve.get_deployment_handle(deployment_name(model_id, "engine"),
                                             step_app_name(app.app_name, model_id, "engine"))
                 .stats.remote().result()
                 if args.placement == "engine" else {"mean_batch_size": float("nan")})
    return {**res.as_dict(), "mean_batch_size": stats["mean_batch_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", nargs="+", default=["vision", "audio"], choices=sorted(MODELS))
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=20.0)
    ap.add_argument("-w", "--warmup", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--placement", default="engine", choices=["inline", "engine"],
                    help="engine: its own deployment (the default of these models); inline: in the ingress")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the plain loop")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="torch threads of the served engine (default: --threads)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides of the served config")
    args = ap.parse_args()

    from apps.config import compose
    from apps.serving import ray_serve

    server = compose([f"server.port={PORT}", *args.overrides]).server
    results: dict[str, dict] = {}
    for modality in args.modality:
        data, _ = sample(modality)
        plain = plain_loop(modality, data, args.batch, args.duration, args.threads)
        results[modality] = {"plain": {"rps": plain}}
        with ray_serve(server, logging_level="ERROR", log_to_driver=False) as session:
            for name, size in (("batched", args.batch), ("unbatched", 1)):
                results[modality][name] = measure_served(session, modality, data, size, args)
        row = results[modality]
        print(f"\n{modality}: {len(data)} bytes per item, concurrency {args.concurrency}, batch {args.batch}")
        print(f"{'':12}{'items/s':>10}{'vs plain':>10}{'p50 ms':>10}{'p99 ms':>10}{'mean batch':>12}  statuses")
        for name, r in row.items():
            print(f"{name:12}{r['rps']:>10.1f}{r['rps'] / plain:>10.2f}{r.get('p50_ms', float('nan')):>10.1f}"
                  f"{r.get('p99_ms', float('nan')):>10.1f}{r.get('mean_batch_size', args.batch):>12}  "
                  f"{r.get('statuses', '')}")
    print("\n" + json.dumps(results, default=float))


if __name__ == "__main__":
    main()
