"""Pipelines: bind nodes and engines into one Ray Serve application (``pipelines.builder``)."""
