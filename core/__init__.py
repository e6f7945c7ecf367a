"""Pieces every layer shares: the validated config schema, the error vocabulary, request types."""
