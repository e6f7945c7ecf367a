"""The HTTP routes, one module each; every router finds the model router and the server
config in ``request.app.state`` (``router``, ``server``), as an OpenAI-compatible server's routers do."""
