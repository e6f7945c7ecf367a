"""The summary of a sweep: ``python -m apps.bench_report <sweep dir> [--objective ...]``, also
run by ``apps.bench``'s callback when a multirun ends.

Reads every job directory's ``result.json`` and ``.hydra/overrides.yaml`` (a job directory
without a result is reported as failed), then prints a Rich table and writes into the sweep
directory:

- ``summary.csv`` and ``summary.json``: every job, its status, overrides and figures, whether
  it is on the Pareto front and whether it is the best;
- ``pareto.png``: throughput against latency for every successful job, the Pareto front
  (no other job is both faster and lower-latency) joined and the best starred;
- ``best.yaml``: the served config of the best job for the goal (``bench.goal``: the highest or
  lowest objective among the jobs within every bound), which the launcher serves as it is:
  ``python -m apps.launch --config-dir <sweep dir> --config-name best``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from apps.bench_config import METRICS, BenchConfig, Goal

RESULT_FILE = "result.json"


def load_jobs(sweep_dir: Path) -> list[dict]:
    """Every job of the sweep, by job number: its result.json, with the overrides Hydra
    recorded; a job directory Hydra created but whose job wrote no result is ``failed``."""
    import yaml

    jobs = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        result_path = job_dir / RESULT_FILE
        if result_path.exists():
            job = json.loads(result_path.read_text())
        else:
            job = {"job": _job_number(job_dir), "status": "failed", "metrics": {},
                   "error": f"no {RESULT_FILE}: the job crashed (see the log in its directory)"}
        overrides_path = job_dir / ".hydra" / "overrides.yaml"
        if overrides_path.exists():
            job["overrides"] = yaml.safe_load(overrides_path.read_text()) or []
        job["dir"] = str(job_dir)
        jobs.append(job)
    return sorted(jobs, key=lambda j: j["job"])


def _job_number(job_dir: Path) -> int:
    return int(job_dir.name) if job_dir.name.isdigit() else -1


def choose_axes(jobs: list[dict], plot) -> tuple[str, str]:
    """(latency-like x, throughput-like y) of the plot and the front; see ``bench.plot``."""
    ok = [j for j in jobs if j["status"] == "ok"]
    text = bool(ok) and all(_number(j["metrics"].get("output_tok_s")) for j in ok)
    x = plot.x if plot.x != "auto" else ("ttft_p99_ms" if text else "p99_ms")
    y = plot.y if plot.y != "auto" else ("output_tok_s" if text else "rps")
    return x, y


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points that no other point dominates (x no higher and y no lower, and
    better in one of them): lower x (latency) and higher y (throughput) are better."""
    front = set()
    for i, (xi, yi) in enumerate(points):
        if not any((xj <= xi and yj >= yi) and (xj < xi or yj > yi) for xj, yj in points):
            front.add(i)
    return front


def best_job(jobs: list[dict], goal: Goal) -> dict | None:
    """The successful job with the best objective within the goal's bounds (the lowest job
    number among equals), or None."""
    scored = [(s, j) for j in jobs if j["status"] == "ok" if (s := goal.score(j["metrics"])) is not None]
    if not scored:
        return None
    sign = 1 if goal.direction == "maximize" else -1
    return max(scored, key=lambda sj: (sign * sj[0], -sj[1]["job"]))[1]


def annotate(jobs: list[dict], bench: BenchConfig) -> dict:
    """Mark each job ``pareto`` and ``best`` and give it the overrides that differ across the
    sweep (``varied``); returns what the sweep as a whole found."""
    x, y = choose_axes(jobs, bench.plot)
    plotted = [j for j in jobs if j["status"] == "ok" and _number(j["metrics"].get(x))
               and _number(j["metrics"].get(y))]
    front = pareto_front([(j["metrics"][x], j["metrics"][y]) for j in plotted])
    on_front = {plotted[i]["job"] for i in front}
    best = best_job(jobs, bench.goal)
    common = set.intersection(*(set(j.get("overrides") or []) for j in jobs)) if jobs else set()
    for j in jobs:
        j["pareto"] = j["job"] in on_front
        j["best"] = best is not None and j["job"] == best["job"]
        j["varied"] = [o for o in j.get("overrides") or [] if o not in common]
    return {"axes": [x, y], "best": best["job"] if best else None, "common": sorted(common),
            "goal": bench.goal.model_dump()}


def report(sweep_dir: Path, bench: BenchConfig | None = None, console=None) -> dict:
    """Summarize ``sweep_dir`` (see the module docstring); returns summary.json's content.
    ``bench`` defaults to the sweep's own ``bench`` section (from its first job's config)."""
    from rich.console import Console

    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    bench = bench or sweep_bench_config(jobs)
    summary = {"sweep_dir": str(sweep_dir), **annotate(jobs, bench), "jobs": jobs}
    (sweep_dir / "summary.json").write_text(json.dumps(finite(summary), indent=2) + "\n")
    write_csv(sweep_dir / "summary.csv", jobs)
    x, y = summary["axes"]
    plot(sweep_dir / "pareto.png", jobs, x, y, bounds=bench.goal.max)
    best = next((j for j in jobs if j["best"]), None)
    if best is not None and bench.write_best:
        write_best(sweep_dir / "best.yaml", best, bench.goal)
    else:
        (sweep_dir / "best.yaml").unlink(missing_ok=True)  # no job meets this goal
    (console or Console()).print(table(jobs, summary))
    return summary


def sweep_bench_config(jobs: list[dict]) -> BenchConfig:
    """The ``bench`` section the sweep's jobs were composed with (the first that validates)."""
    from omegaconf import OmegaConf
    from pydantic import ValidationError

    for j in jobs:
        path = Path(j["dir"]) / ".hydra" / "config.yaml"
        if path.exists():
            cfg = OmegaConf.to_container(OmegaConf.load(path))
            assert isinstance(cfg, dict), f"{path}: Hydra writes a job's config as a mapping"
            section = cfg.get("bench") or {}
            try:
                return BenchConfig.model_validate(section)
            except ValidationError:
                continue
    return BenchConfig()


CSV_FIELDS = ("job", "status", "overrides", "pareto", "best", "model_id", "deploy_s", *METRICS, "error")


def write_csv(path: Path, jobs: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for j in jobs:
            row = {**{k: v for k, v in (j.get("metrics") or {}).items() if k in METRICS}, **j}
            row["overrides"] = " ".join(j.get("overrides") or [])
            row["error"] = _first_lines(j.get("error"))
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def table(jobs: list[dict], summary: dict):
    """A Rich table of the sweep: one row per job, the best starred, the front marked."""
    from rich.table import Table

    text = any(_number((j.get("metrics") or {}).get("output_tok_s")) for j in jobs)
    cols = [("req/s", "rps", "{:.1f}"), ("p50 ms", "p50_ms", "{:.1f}"), ("p99 ms", "p99_ms", "{:.1f}")]
    if text:
        cols += [("out tok/s", "output_tok_s", "{:.0f}"), ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"),
                 ("TTFT p99 ms", "ttft_p99_ms", "{:.1f}"), ("TPOT p50 ms", "tpot_p50_ms", "{:.2f}")]
    cols += [("errors", "errors", "{}")]
    goal = summary["goal"]
    bounds = ", ".join(f"{k} ≤ {v:g}" for k, v in goal["max"].items())
    t = Table(title=f"sweep {summary['sweep_dir']}: {goal['direction']} {goal['objective']}"
                    + (f" with {bounds}" if bounds else ""),
              caption="★ best for the goal · ◆ Pareto front of "
                      f"{summary['axes'][1]} against {summary['axes'][0]}"
                      + (f" · every job: {' '.join(summary['common'])}" if summary["common"] else ""))
    t.add_column("job", justify="right")
    t.add_column("status")
    t.add_column("config", overflow="fold")
    for name, _, _ in cols:
        t.add_column(name, justify="right")
    t.add_column("", overflow="fold")
    for j in jobs:
        m = j.get("metrics") or {}
        cells = [fmt.format(m[key]) if _number(m.get(key)) else "" for _, key, fmt in cols]
        mark = ("★" if j.get("best") else "") + ("◆" if j.get("pareto") else "")
        note = mark if j["status"] == "ok" else _why(j)
        style = None if j["status"] == "ok" else "red"
        t.add_row(str(j["job"]), j["status"], " ".join(j.get("varied") or []), *cells, note, style=style)
    return t


def plot(path: Path, jobs: list[dict], x: str, y: str, bounds: dict | None = None) -> None:
    """pareto.png: ``y`` against ``x`` for every successful job, the front joined, the best
    starred, each point labelled with its job number; the goal's bounds on either axis drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    pts = [j for j in jobs if j["status"] == "ok" and _number(j["metrics"].get(x)) and _number(j["metrics"].get(y))]
    fig, ax = plt.subplots(figsize=(7, 5))
    if pts:
        ax.scatter([j["metrics"][x] for j in pts], [j["metrics"][y] for j in pts], color="tab:blue",
                   label="configuration")
        front = sorted((j for j in pts if j.get("pareto")), key=lambda j: j["metrics"][x])
        ax.plot([j["metrics"][x] for j in front], [j["metrics"][y] for j in front], "o-", color="tab:red",
                drawstyle="steps-post", label="Pareto front")
        for j in pts:
            ax.annotate(f"#{j['job']}", (j["metrics"][x], j["metrics"][y]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
            if j.get("best"):
                ax.scatter([j["metrics"][x]], [j["metrics"][y]], marker="*", s=300, color="gold",
                           edgecolors="black", zorder=3, label="best for the goal")
        for key, bound in (bounds or {}).items():
            if key in (x, y):
                line = ax.axvline if key == x else ax.axhline
                line(bound, color="gray", linestyle="--", label=f"{key} ≤ {bound:g}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no successful job", ha="center", va="center", transform=ax.transAxes)
    failed = len(jobs) - len(pts)
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.set_title(f"{len(pts)} configuration(s)" + (f", {failed} not plotted (failed or invalid)" if failed else ""))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_best(path: Path, job: dict, goal: Goal) -> None:
    """The served config the best job ran, as a primary config the launcher serves as it is
    (the job's composed config less ``load`` and ``bench``, resolved)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(Path(job["dir"]) / ".hydra" / "config.yaml"), resolve=True)
    assert isinstance(cfg, dict), "Hydra writes a job's config as a mapping"
    for key in ("load", "bench"):
        cfg.pop(key, None)
    value = job["metrics"][goal.objective]
    bounds = ", ".join(f"{k} <= {v:g}" for k, v in goal.max.items()) or "none"
    header = [
        f"# Best configuration of the sweep in {path.parent}: job {job['job']}, "
        f"{goal.objective} = {value:.4g} ({goal.direction}; bounds: {bounds}).",
        f"# Job overrides: {' '.join(job.get('overrides') or []) or '(none)'}",
        f"# Serve it: python -m apps.launch --config-dir {path.parent} --config-name {path.stem}",
    ]
    path.write_text("\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(cfg)))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _why(job: dict) -> str:
    """What went wrong with a job, short: its first problem, or its error's first line."""
    problems = job.get("problems") or []
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{problems[0][0]}: {problems[0][1]}{more}"
    return _first_lines(job.get("error"), 1)


def _first_lines(text: str | None, n: int = 3) -> str:
    return " ".join(line.strip() for line in (text or "").splitlines()[:n])


def finite(value):
    """NaN (a percentile of no samples) as null, so that the JSON files stay strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--objective", choices=METRICS, help="override bench.goal.objective")
    ap.add_argument("--direction", choices=("maximize", "minimize"), help="override bench.goal.direction")
    ap.add_argument("--max", action="append", default=[], metavar="METRIC=BOUND",
                    help="an upper bound (repeatable); replaces bench.goal.max")
    args = ap.parse_args()
    if not args.sweep_dir.is_dir():
        ap.error(f"{args.sweep_dir} is not a directory")
    bench = sweep_bench_config(load_jobs(args.sweep_dir))
    goal = bench.goal.model_dump()
    if args.objective:
        goal["objective"] = args.objective
    if args.direction:
        goal["direction"] = args.direction
    if args.max:
        goal["max"] = dict(kv.split("=", 1) for kv in args.max)
    report(args.sweep_dir, bench.model_copy(update={"goal": Goal.model_validate(goal)}))


if __name__ == "__main__":
    main()
