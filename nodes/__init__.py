"""Pipeline nodes: the HTTP ingress/router and the pre/postprocess steps around engines."""
