"""Sweeps without Ray: the bench config and its schema, a job's invalid path, and the summary
(Pareto front, best configuration, files) of a sweep directory built from known figures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose as hydra_compose, initialize_config_dir
from omegaconf import OmegaConf

from apps.bench_config import BenchConfig, Goal, driven_model, split_bench_config
from apps.bench_report import best_job, pareto_front, report
from apps.config import CONF_DIR, to_app_config, to_plain
from core.validate import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def compose_bench(overrides=(), **kw):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("bench", overrides=list(overrides), **kw)


def split(overrides=()):
    return split_bench_config(to_plain(compose_bench(overrides)))


def problems(overrides) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        split(overrides)
    return dict(e.value.problems)


def test_bench_config_is_the_default_with_echo_and_a_load():
    app, load, bench = split()
    assert list(app.model) == ["echo"] and app.server.port == 8100
    assert load.mode == "closed" and load.concurrency == 8
    assert bench.goal.objective == "rps" and bench.goal.max == {"error_rate": 0}
    model_id, request = driven_model(app, load)
    assert model_id == "echo" and request.body == {"input": "hello world"} and not request.stream


def test_text_model_streams_for_token_figures():
    app, load, _ = split(["model=tiny_llama", "load.concurrency=32"])
    model_id, request = driven_model(app, load)
    assert model_id == "tiny-llama" and request.stream and "{n}" in request.body["prompt"]


def test_several_models_and_the_one_driven():
    app, load, _ = split(["model=[echo,echo_remote]", "load.model=echo_remote"])
    assert driven_model(app, load)[0] == "echo-remote"


def test_load_and_bench_problems_name_their_dotted_key():
    assert problems(["+load.concurency=8"]) == {"load.concurency": "unknown key"}
    assert "load.concurrency" in problems(["load.concurrency=0"])
    assert "load.rate" in problems(["load.mode=open"])
    assert "bench.goal.objective" in problems(["bench.goal.objective=speed"])
    (key, msg), = problems(["+bench.goal.max.speed=1"]).items()
    assert key.startswith("bench.goal.max.speed") and "'ttft_p99_ms'" in msg and "'speed'" in msg
    assert "no model 'nope'" in problems(["load.model=nope"])["load.model"]
    assert "load.requests.text" in problems(["model=tiny_llama", "~load.requests.text"])
    # the served config's problems and the load's, together
    both = problems(["model.echo.engine_kwargs.delay_s=-1", "load.duration_s=0"])
    assert set(both) == {"model.echo.engine_kwargs.delay_s", "load.duration_s"}


def test_sweep_callback_and_ray_launcher_configs_compose():
    from hydra.utils import get_class, instantiate

    cfg = compose_bench(["hydra/launcher=ray_cluster"], return_hydra_config=True)
    assert get_class(cfg.hydra.callbacks.summary._target_).__name__ == "SweepSummary"
    launcher = instantiate(cfg.hydra.launcher)  # hydra-ray-launcher's RayLauncher; starts nothing
    assert type(launcher).__name__ == "RayLauncher"
    assert launcher.ray_cfg.init.address == "auto" and launcher.ray_cfg.remote.num_cpus == 1
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"


def test_an_invalid_job_is_recorded_and_starts_nothing(tmp_path):
    import ray

    from apps.bench_job import run_job

    dcfg = compose_bench(["model.echo.engine_kwargs.delay_s=-1"])
    result = run_job(dcfg, 3, ["model.echo.engine_kwargs.delay_s=-1"], tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == result and saved["status"] == "invalid" and saved["job"] == 3
    assert saved["problems"] == [["model.echo.engine_kwargs.delay_s",
                                  "Input should be greater than or equal to 0 (got -1)"]]
    assert not ray.is_initialized()


def test_pareto_front_lower_x_higher_y():
    pts = [(50, 100), (80, 150), (90, 120), (40, 90), (50, 100)]
    assert pareto_front(pts) == {0, 1, 3, 4}  # (90, 120) is dominated by (80, 150); ties stay
    assert pareto_front([]) == set()


def test_goal_scores_within_bounds_only():
    goal = Goal(objective="output_tok_s", max={"ttft_p99_ms": 500})
    assert goal.score({"output_tok_s": 900.0, "ttft_p99_ms": 450.0}) == 900.0
    assert goal.score({"output_tok_s": 1200.0, "ttft_p99_ms": 650.0}) is None
    assert goal.score({"output_tok_s": float("nan"), "ttft_p99_ms": 1.0}) is None
    assert goal.score({"output_tok_s": 1.0}) is None  # a bound on a figure the job lacks
    jobs = [{"job": 0, "status": "ok", "metrics": {"p99_ms": 9.0}},
            {"job": 1, "status": "ok", "metrics": {"p99_ms": 5.0}},
            {"job": 2, "status": "failed", "metrics": {"p99_ms": 1.0}}]
    assert best_job(jobs, Goal(objective="p99_ms", direction="minimize"))["job"] == 1


# job: (overrides, status, metrics) — known figures for the summary
JOBS = {
    0: (["load.concurrency=4"], "ok", {"rps": 100.0, "p99_ms": 50.0, "error_rate": 0.0}),
    1: (["load.concurrency=8"], "ok", {"rps": 150.0, "p99_ms": 80.0, "error_rate": 0.0}),
    2: (["load.concurrency=16"], "ok", {"rps": 120.0, "p99_ms": 90.0, "error_rate": 0.0}),
    3: (["load.concurrency=32"], "ok", {"rps": 90.0, "p99_ms": 40.0, "error_rate": 0.5}),
    4: (["load.concurrency=0"], "invalid", {}),
    5: (["load.concurrency=64"], None, {}),  # crashed before writing result.json
}


@pytest.fixture
def sweep(tmp_path):
    """A sweep directory as apps.bench leaves it, with the figures of JOBS."""
    for num, (overrides, status, metrics) in JOBS.items():
        job_dir = tmp_path / str(num)
        (job_dir / ".hydra").mkdir(parents=True)
        all_overrides = ["server.port=8123", *overrides]
        OmegaConf.save(compose_bench(all_overrides), job_dir / ".hydra" / "config.yaml")
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(all_overrides))
        if status is not None:
            result = {"job": num, "status": status, "overrides": all_overrides, "metrics": metrics,
                      "error": "invalid config:\n  load.concurrency: too small" if status == "invalid" else None,
                      "problems": [["load.concurrency", "too small"]] if status == "invalid" else []}
            (job_dir / "result.json").write_text(json.dumps(result))
    return tmp_path


def test_summary_files_front_and_best(sweep):
    from rich.console import Console

    console = Console(record=True, width=200)
    summary = report(sweep, console=console)
    assert summary["axes"] == ["p99_ms", "rps"]
    assert summary["best"] == 1  # highest rps with error_rate <= 0 (job 3 has errors)
    assert summary["common"] == ["server.port=8123"]
    by_job = {j["job"]: j for j in summary["jobs"]}
    assert {n for n, j in by_job.items() if j["pareto"]} == {0, 1, 3}
    assert by_job[4]["status"] == "invalid" and by_job[5]["status"] == "failed"
    assert "no result.json" in by_job[5]["error"]

    assert json.loads((sweep / "summary.json").read_text())["best"] == 1
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "invalid", "failed"]
    assert rows[1]["best"] == "True" and rows[2]["pareto"] == "False" and rows[0]["rps"] == "100.0"
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = console.export_text()
    assert "load.concurrency: too small" in text and "load.concurrency=8" in text and "★" in text


def test_best_yaml_is_a_config_the_launcher_serves(sweep):
    report(sweep, BenchConfig(goal=Goal(objective="rps", max={"p99_ms": 60, "error_rate": 0})))
    best = (sweep / "best.yaml").read_text()
    assert "job 0" in best.splitlines()[0]
    with initialize_config_dir(config_dir=str(sweep), version_base="1.3"):
        cfg = to_app_config(hydra_compose("best"))
    assert list(cfg.model) == ["echo"] and cfg.server.port == 8123
    assert {"load", "bench"}.isdisjoint(yaml.safe_load(best))
    out = subprocess.run([sys.executable, "-m", "apps.launch", "--config-dir", str(sweep),
                          "--config-name", "best", "--cfg", "job"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "model_id: echo" in out.stdout

    # a goal no job meets: no best, and no stale best.yaml
    summary = report(sweep, BenchConfig(goal=Goal(objective="rps", max={"p99_ms": 10})))
    assert summary["best"] is None and not (sweep / "best.yaml").exists()


def test_report_cli_takes_another_goal(sweep):
    out = subprocess.run([sys.executable, "-m", "apps.bench_report", str(sweep), "--objective", "p99_ms",
                          "--direction", "minimize", "--max", "error_rate=0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads((sweep / "summary.json").read_text())["best"] == 0
