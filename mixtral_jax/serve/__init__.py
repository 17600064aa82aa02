"""`mixtral-jax serve`: an OpenAI-compatible HTTP server over the decode slots of `mixtral_jax.engine`.

`protocol` holds the request and response shapes, `scheduler` the thread that runs the slots, `app` the
HTTP routes and metrics.
"""

MAX_QUEUE = 256  # generation requests waiting for a free slot, at most; more are a 429
MAX_BODY_BYTES = 4 * 2**20  # a request body's size at most; more is a 413
SHUTDOWN_GRACE_S = 30.0  # how long requests in flight may take to finish once the server is told to stop
