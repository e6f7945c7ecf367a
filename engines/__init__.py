"""Inference engines: one abstract base (``engines.base.Engine``), one module per backend."""
