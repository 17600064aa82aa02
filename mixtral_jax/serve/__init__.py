"""`mixtral-jax serve`: an OpenAI-compatible HTTP server over the decode slots of `mixtral_jax.engine`.

`protocol` holds the request and response shapes, `scheduler` the thread that runs the slots, `app` the
HTTP routes and metrics.
"""
