"""Entry points: ``python -m apps.launch`` (serve), ``python -m apps.bench`` (sweeps)."""
