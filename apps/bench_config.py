"""The ``load`` and ``bench`` sections of ``conf/bench.yaml``: what each sweep job sends, and
how the sweep's jobs are compared.

Neither is part of the served :class:`~core.config.AppConfig`: :func:`split_bench_config`
takes them out of the composed config, validates all three, and raises one
:class:`~core.validate.ConfigError` naming every bad dotted key (``load.concurrency``...).
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeGuard, get_args

from pydantic import Field

from core.config import AppConfig, Strict
from core.validate import ConfigError, check_with, validate_config

# Figures a job records (apps.loadgen.LoadResult, plus error_rate); the goal and the plot
# name them.
Metric = Literal["rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "errors", "error_rate", "output_tokens",
                 "output_tok_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms",
                 "tpot_p99_ms"]
METRICS: tuple[Metric, ...] = get_args(Metric)


class RequestSpec(Strict):
    """The request a job sends to a model of one pipeline (``model_id`` is added)."""

    body: dict[str, Any] = Field(..., description="JSON body of POST /v1/infer; '{n}' in a string "
                                 "becomes the request's number (distinct prompts defeat prefix caches).")
    stream: bool = Field(False, description="Send stream: true and measure tokens/s, TTFT and TPOT.")


class LoadConfig(Strict):
    """The ``load`` group: the load each job drives once its app is ready."""

    mode: Literal["closed", "open"] = Field("closed", description="closed: fixed concurrency; "
                                            "open: Poisson arrivals at `rate`.")
    concurrency: int = Field(8, ge=1, description="Closed loop: requests in flight; open loop: the cap.")
    rate: float | None = Field(None, gt=0, description="Open loop: requests per second.")
    duration_s: float = Field(10.0, gt=0, description="Measured seconds.")
    warmup_s: float = Field(2.0, ge=0, description="Unmeasured seconds of load before that.")
    timeout_s: float = Field(300.0, gt=0, description="Client-side limit of one request.")
    model: str | None = Field(None, description="Key (in `model`) of the model to drive; "
                              "default: the only or first one.")
    requests: dict[str, RequestSpec] = Field(..., description="The request to send, by the "
                                             "driven model's pipeline.")
    progress: bool = Field(True, description="Show a progress bar while the load runs.")


class Goal(Strict):
    """What the best configuration is: the highest (or lowest) ``objective`` among the jobs
    that succeeded and stay within every bound of ``max``."""

    objective: Metric = Field(default="rps", description="The metric to optimize.")
    direction: Literal["maximize", "minimize"] = Field(default="maximize", description=(
        "Whether the best job has the highest or the lowest objective."))
    max: dict[Metric, float] = Field(default_factory=dict, description="Upper bounds, e.g. "
                                     "{ttft_p99_ms: 500, error_rate: 0}.")

    def score(self, metrics: dict) -> float | None:
        """The objective of a job that meets the bounds, else None."""
        value = metrics.get(self.objective)
        if not _number(value):
            return None
        for key, bound in self.max.items():
            got = metrics.get(key)
            if not _number(got) or got > bound:
                return None
        return value


class Plot(Strict):
    """Axes of pareto.png; ``auto`` picks output tokens/s against p99 TTFT when every
    successful job streamed tokens, else requests/s against p99 latency."""

    x: Metric | Literal["auto"] = Field(default="auto", description="Latency-like axis (lower is better).")
    y: Metric | Literal["auto"] = Field(default="auto", description="Throughput-like axis (higher is better).")


class BenchConfig(Strict):
    """The ``bench`` section: how the sweep summary compares its jobs."""

    goal: Goal = Field(default_factory=Goal, description="Which job is the best (★ in the summary).")
    plot: Plot = Field(default_factory=Plot, description="The axes of pareto.png.")
    write_best: bool = Field(default=True, description="Write best.yaml (a config apps.launch serves).")


def _number(v) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not math.isnan(v)


def split_bench_config(raw: dict) -> tuple[AppConfig, LoadConfig, BenchConfig]:
    """Validate a composed bench config (a plain dict without ``hydra``).

    Raises:
        ConfigError: every problem of the served config, ``load`` and ``bench``, by dotted key.
    """
    raw = dict(raw)
    load_raw, bench_raw = raw.pop("load", None) or {}, raw.pop("bench", None) or {}
    problems = check_with(LoadConfig, load_raw, "load") + check_with(BenchConfig, bench_raw, "bench")
    try:
        app = validate_config(raw)
    except ConfigError as err:
        raise ConfigError(err.problems + problems) from None
    if problems:
        raise ConfigError(problems)
    load = LoadConfig.model_validate(load_raw)
    problems = _cross_checks(app, load)
    if problems:
        raise ConfigError(problems)
    return app, load, BenchConfig.model_validate(bench_raw)


def _cross_checks(app: AppConfig, load: LoadConfig) -> list[tuple[str, str]]:
    """What the load asks of the served config: a model to drive and a request for its pipeline."""
    problems = []
    if load.mode == "open" and load.rate is None:
        problems.append(("load.rate", "required when load.mode is open (requests per second)"))
    key = load.model or next(iter(app.model))
    if key not in app.model:
        problems.append(("load.model", f"no model {key!r} in this config; known: {', '.join(app.model)}"))
    elif app.model[key].pipeline not in load.requests:
        pipeline = app.model[key].pipeline
        problems.append((f"load.requests.{pipeline}", f"no request for pipeline {pipeline!r} "
                         f"(model.{key}); add load.requests.{pipeline}.body"))
    return problems


def driven_model(app: AppConfig, load: LoadConfig) -> tuple[str, RequestSpec]:
    """The model_id the load goes to and the request it sends (after :func:`split_bench_config`)."""
    model = app.model[load.model or next(iter(app.model))]
    return model.model_id, load.requests[model.pipeline]
