"""The OpenAI-compatible HTTP server over an :class:`~adaptr.serving.AdapterServer`:
``protocol`` (request parameters, stop strings), ``batcher`` (the app's requests as jobs of the scheduler), ``app``
(the FastAPI app, its limits, its lifespan)."""
