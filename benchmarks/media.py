"""Media throughput: /v1/infer with dynamic batching vs ``max_batch_size: 1`` vs a plain torch loop.

Per modality (``vision``: the tiny resnet18 on 320x240 JPEGs; ``audio``: the tiny wav2vec2
recognizer on 4 s WAV clips; ``video``: the tiny resnet18 on the 8 frames the video node samples
from 4 s 240x240 MP4 clips), these sides:

- ``plain``: the ceiling on this machine, no server: decode + transforms + the model, in this
  process, in a loop over batches of ``--batch`` items (default: 16 images or clips of audio, 4
  videos, each model config's ``max_batch_size``; the same code the nodes and engines run)
  with ``--threads`` torch threads;
- ``plain xN`` (``--plain-instances``, default 2): the same loop in N threads at once, with the
  torch threads divided among them, as an engine with ``instances: N`` runs its batches;
- ``batched``: the model served by mmserve (engine in its own deployment unless ``--placement
  inline``), closed loop at concurrency ``-c`` through HTTP (base64 JSON), ``max_batch_size:
  --batch``, the model config's ``instances`` and torch threads (``--engine-threads`` sets them);
- ``unbatched``: the same with ``max_batch_size: 1``.

The two served configs run as sides (``benchmarks.sides``): each on a local Ray of its own,
started once and frozen while anything else is measured, so that a round's runs are
seconds apart, each with the machine to itself (the plain loops run with every side frozen). The order
reverses from round to round; each run is compared with the ``plain`` run of its round, and
a side is summed up by the median of its rounds. As in ``benchmarks.vllm_serve``, a run during
which the hypervisor stole more than ``--max-stolen`` of the CPU time is run again, up to
``--retries`` times, and the least stolen run counts. The mean batch comes from the served
side's ``/metrics`` (``mmserve_batch_size``) before and after its run.

``python -m benchmarks.media [--modality vision audio video] [--rounds 3] [-c 32] [-d 20] [--batch N]
[--plain-instances 2] [--placement engine|inline] [--max-stolen 0.02] [--retries 1] [--also "OVERRIDES"]...
[-- overrides...]`` prints items/s, the ratios to ``plain`` and to each ``plain xN``; ``--also`` adds a batched side
with more overrides, compared with the same plain runs: an A/B of a setting within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

from benchmarks.sides import add_also_arg, add_steal_args, all_up, least_stolen, mmserve_side, steal, steal_share

MODELS = {"vision": ("tiny_resnet", "vision"), "audio": ("tiny_asr", "asr"), "video": ("tiny_video", "video")}
SERVED = ("batched", "unbatched")


def sample(modality: str) -> tuple[bytes, str]:
    from tests import media

    if modality == "vision":
        return media.encode_image(media.image(320, 240), "jpeg"), "jpeg"
    if modality == "video":
        return media.encode_video(frames=40, fps=10, size=240), "mp4"
    return media.encode_audio(media.clip_with_speech(before_s=1.0, speech_s=1.5, after_s=1.5)), "wav"


class PlainLoop:
    """The modality's preprocess node and engine, loaded once in this process."""

    def __init__(self, modality: str, data: bytes, batch: int | None, threads: int) -> None:
        from apps.config import compose
        from core.registry import engine_class, node_class

        key, pipe = MODELS[modality]
        cfg = compose([f"model=[{key}]", f"pipeline=[{pipe}]"])
        self.model, spec = cfg.model[key], cfg.pipeline[pipe].preprocess
        self.node = node_class(spec.name)(spec.kwargs, self.model)
        self.engine = engine_class(self.model.engine)(self.model)
        asyncio.run(self.node.start())
        self.engine.load()
        self.params = self.engine.Params()
        self.data, self.threads, self.modality = data, threads, modality
        self.batch = batch or self.engine.kwargs.max_batch_size  # the model config's by default

    def _decode(self):
        if self.modality == "video":  # the frames the node samples when a request names none
            return self.node.decode(self.data, None, self.node.kwargs.num_frames, self.model.model_id)
        return self.node.decode(self.data, self.model.model_id)

    def _one_batch(self) -> None:
        import torch

        payloads = [self._decode() for _ in range(self.batch)]
        with torch.inference_mode():
            self.engine.run_batch([(p, self.params) for p in payloads])

    def run(self, seconds: float, instances: int = 1) -> dict:
        """Items/s of decode + preprocess + model over batches, for ``seconds`` after one
        batch of warm-up: ``instances`` threads, each looping over batches of its own, with
        torch's threads divided among them (as an engine's ``instances``)."""
        import threading

        import torch

        torch.set_num_threads(max(1, self.threads // instances))
        self._one_batch()
        done = [0] * instances
        stolen = steal()
        t0 = time.perf_counter()

        def loop(i: int) -> None:
            while time.perf_counter() - t0 < seconds:
                self._one_batch()
                done[i] += self.batch

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(instances)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return {"rps": sum(done) / (time.perf_counter() - t0), "stolen": steal_share(stolen, steal())}


def served_overrides(modality: str, max_batch: int, args) -> list[str]:
    """The Hydra overrides of a served side."""
    key, pipe = MODELS[modality]
    return [f"model=[{key}]", f"pipeline=[{pipe}]",
            f"model.{key}.engine_kwargs.max_batch_size={max_batch}",
            *([f"++model.{key}.engine_kwargs.torch_threads={args.engine_threads}"] if args.engine_threads else []),
            f"model.{key}.deployment.engine.ray_actor_options.num_cpus=1",
            f"model.{key}.deployment.engine.max_ongoing_requests={max(args.concurrency, max_batch)}",
            f"model.{key}.deployment.placement={args.placement}", *args.overrides]


def batch_totals(url: str, model_id: str) -> tuple[float, float]:
    """(items, batches) the model's engine has run, from the side's ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    items = batches = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name != "mmserve_batch_size":
            continue
        for s in family.samples:
            if s.labels.get("model_id") == model_id:
                if s.name.endswith("_sum"):
                    items += s.value
                elif s.name.endswith("_count"):
                    batches += s.value
    return items, batches


def served_run(url: str, model_id: str, data: bytes, args) -> dict:
    """One closed-loop run against a served side, with its mean batch and the steal meanwhile."""
    from apps.loadgen import run_load
    from tests.media import b64

    items, batches = batch_totals(url, model_id)
    stolen = steal()
    res = asyncio.run(run_load(f"{url}/v1/infer", {"model_id": model_id, "input": {"data": b64(data)}},
                               concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup))
    out = {**res.as_dict(), "stolen": steal_share(stolen, steal())}
    items2, batches2 = batch_totals(url, model_id)
    out["mean_batch_size"] = (items2 - items) / (batches2 - batches) if batches2 > batches else float("nan")
    return out


def measure(modality: str, data: bytes, args) -> tuple[int, dict[str, list[dict]]]:
    """The batch size, and every round's runs of the plain loop and the served sides of one
    modality, on ``data``."""
    plain = PlainLoop(modality, data, args.batch, args.threads)
    batch = plain.batch
    model_id = plain.model.model_id
    sides = [mmserve_side(served_overrides(modality, size, args), name=name)
             for name, size in zip(SERVED, (batch, 1))]
    sides += [mmserve_side([*served_overrides(modality, batch, args), *extra.split()], name=f"also {i}")
              for i, extra in enumerate(args.also, 1)]
    loops = {"plain": 1, **{f"plain x{n}": n for n in args.plain_instances if n > 1}}
    runs: dict[str, list[dict]] = {**{name: [] for name in loops}, **{side.name: [] for side in sides}}
    with all_up(sides):
        order = [*loops, *sides]
        for i in range(args.rounds):
            for side in order if i % 2 == 0 else order[::-1]:
                if isinstance(side, str):
                    run = least_stolen(lambda: plain.run(args.duration, loops[side]), args.max_stolen,
                                       args.retries)
                    runs[side].append(run)
                    continue
                with side.running() as url:
                    run = least_stolen(lambda: served_run(url, model_id, data, args), args.max_stolen,
                                       args.retries)
                runs[side.name].append(run)
            print(json.dumps({"modality": modality, "round": i + 1,
                              **{name: {k: r[-1][k] for k in ("rps", "stolen", "attempts")}
                                 for name, r in runs.items()}}, default=float), flush=True)
    return batch, runs


def table(modality: str, size: int, batch: int, runs: dict[str, list[dict]], args) -> None:
    plain = runs["plain"]
    print(f"\n{modality}: {size} bytes per item, concurrency {args.concurrency}, batch {batch}, "
          f"placement {args.placement}, {args.rounds} rounds, each served run against the plain run "
          "of its round")
    width = max(25, 5 + 6 * len(plain))  # "0.96 (" and "0.80, " per round, less 1
    rps = {name: statistics.median(r["rps"] for r in rr) for name, rr in runs.items()}
    # the loop in the engines' form: items/s over its median items/s
    forms = [name for name in runs if name.startswith("plain x")]
    print(f"{'':10} | {'items/s':>8} | {'vs plain, median (rounds)':<{width}} | "
          f"{''.join(f'vs {form} | ' for form in forms)}{'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'mean batch':>10} | {'stolen':>6} | {'runs again':>10} | statuses")
    for name, rr in runs.items():
        ratios = [r["rps"] / p["rps"] for r, p in zip(rr, plain)]
        ratio = f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})"
        if name.startswith("plain"):
            served = f"{'':>7} | {'':>7} | {batch:>10}"
        else:
            served = " | ".join(f"{statistics.median(r[key] for r in rr):>{w}{f}}" for key, w, f in (
                ("p50_ms", 7, ".0f"), ("p99_ms", 7, ".0f"), ("mean_batch_size", 10, ".1f")))
        statuses: dict[str, int] = {}
        for r in rr:
            for status, n in r.get("statuses", {}).items():
                statuses[status] = statuses.get(status, 0) + n
        vs_forms = "".join(f"{rps[name] / rps[form]:>{len(form) + 3}.2f} | " for form in forms)
        print(f"{name:10} | {rps[name]:>8.1f} | {ratio:<{width}} | {vs_forms}{served} | "
              f"{100 * statistics.median(r['stolen'] for r in rr):>5.1f}% | "
              f"{sum(r['attempts'] - 1 for r in rr):>10} | {statuses or ''}")
    for i, extra in enumerate(args.also, 1):
        print(f"also {i}: batched with {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", nargs="+", default=["vision", "audio"], choices=sorted(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=20.0)
    ap.add_argument("-w", "--warmup", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=None,
                    help="items per batch (default: the model config's max_batch_size)")
    ap.add_argument("--placement", default="engine", choices=["inline", "engine"],
                    help="engine: its own deployment (the default of these models); inline: in the ingress")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the plain loop")
    ap.add_argument("--plain-instances", type=int, nargs="*", default=[2], metavar="N", help=(
        "also run the plain loop in N threads at once, each over batches of its own, with the "
        "torch threads divided among them (an engine's `instances`): side 'plain xN' (default 2)"))
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="torch threads of the served engine (default: the model config's)")
    add_steal_args(ap)
    add_also_arg(ap, "batched side")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides of the served configs")
    args = ap.parse_args()

    data = {modality: sample(modality)[0] for modality in args.modality}
    results = {modality: measure(modality, data[modality], args) for modality in args.modality}
    for modality, (batch, runs) in results.items():
        table(modality, len(data[modality]), batch, runs, args)
    print("\n" + json.dumps({modality: runs for modality, (_, runs) in results.items()}, default=float))


if __name__ == "__main__":
    main()
