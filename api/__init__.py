"""The HTTP API: the FastAPI app of the ingress, its routes, middleware and error rendering."""
