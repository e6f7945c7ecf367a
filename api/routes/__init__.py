"""The HTTP routes, one module each; every route takes the request's one :class:`api.call.Call`
(``call: CallDep``), which holds the model router and the server config (``call.router``,
``call.server``) and the rest of the request's life."""
