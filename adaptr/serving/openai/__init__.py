"""The OpenAI-compatible HTTP server over an :class:`~adaptr.serving.AdapterServer`:
``protocol`` (request parameters, stop strings), ``batcher`` (batches of requests), ``app``
(the FastAPI app, its limits, its lifespan)."""
