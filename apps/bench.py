"""``python -m apps.bench [-m] [hydra overrides]``: deploy a serving configuration, drive load
at it and record what it measured (:mod:`apps.bench_job`); with ``-m``, once per configuration
of the grid, then one summary of the whole sweep (:mod:`apps.bench_report`).

The task returns the goal's objective (NaN when the job failed or broke a bound), which a
search sweeper can optimize.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import hydra
from omegaconf import DictConfig, OmegaConf

from apps.bench_job import run_job
from apps.config import CONF_DIR


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
def main(dcfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    # typed as the HydraConf schema, HydraConfig.get() returns the DictConfig built from it
    hc = cast(DictConfig, HydraConfig.get())
    num = OmegaConf.select(hc, "job.num", default=0)  # a single run (no -m) has no job number
    result = run_job(dcfg, num, list(hc.overrides.task), Path(hc.runtime.output_dir))
    return result["score"] if result["score"] is not None else math.nan


if __name__ == "__main__":
    main()
