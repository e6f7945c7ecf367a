"""The media engines' networks under two Python environments (two torch builds), in alternating
rounds: is a change of torch what moved the media figures?

    python -m benchmarks.torch_ab --python .venv/bin/python /tmp/torch211/bin/python --rounds 5

Each round runs, in each environment in turn (the order reversing every round), a fresh process
that times forward passes on the CPU with 2 torch threads: torchvision's resnet18 in
channels_last on a batch of 16 images of 224x224 (what the vision and video engines run, random
weights), and torchaudio's wav2vec2 base on a batch of 16 clips of 4 s (the recognizer's
architecture at the size of a real model's). It prints each environment's torch version and the
medians of the rounds, items a second, with the ratio to the first environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

CHILD = r"""
import json, time, torch, torchvision
torch.set_num_threads(2)
torch.manual_seed(0)
out = {"torch": torch.__version__}

def rate(model, batch):  # items a second over SECONDS, after one pass
    with torch.inference_mode():
        model(batch)
        t = time.perf_counter(); n = 0
        while time.perf_counter() - t < SECONDS:
            model(batch); n += len(batch)
        return n / (time.perf_counter() - t)

net = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
out["resnet18"] = rate(net, torch.randn(16, 3, 224, 224).to(memory_format=torch.channels_last))
try:
    from torchaudio.models import wav2vec2_base
    out["wav2vec2"] = rate(wav2vec2_base(aux_num_out=32).eval(), torch.randn(16, 64000))
except Exception as err:
    out["wav2vec2_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def run(python: str, seconds: float) -> dict:
    done = subprocess.run([python, "-c", CHILD.replace("SECONDS", str(seconds))],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", nargs="+", required=True, help="interpreters of the environments")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10.0, help="time per network per run")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {p: [] for p in args.python}
    for r in range(args.rounds):
        order = args.python if r % 2 == 0 else list(reversed(args.python))
        for python in order:
            results[python].append(run(python, args.seconds))
            print(json.dumps({"round": r + 1, "python": python, **results[python][-1]}), flush=True)
    base = {k: statistics.median(x[k] for x in results[args.python[0]]) for k in ("resnet18", "wav2vec2")
            if all(k in x for x in results[args.python[0]])}
    print(f"medians of {args.rounds} rounds, items/s (ratio to the first)")
    for python, runs in results.items():
        cells = []
        for key in ("resnet18", "wav2vec2"):
            if all(key in x for x in runs):
                med = statistics.median(x[key] for x in runs)
                ratio = f" ({med / base[key]:.2f})" if key in base else ""
                cells.append(f"{key} {med:.1f}{ratio} [{', '.join(f'{x[key]:.1f}' for x in runs)}]")
        print(f"torch {runs[0]['torch']:<14} {python}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
