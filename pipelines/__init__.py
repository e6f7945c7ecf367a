"""Pipelines: bind nodes and engines into one Ray Serve application (``apps.builder`` binds them with the ingress)."""
