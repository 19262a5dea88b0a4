"""The OpenAI-compatible HTTP server over an :class:`~adaptr.serving.AdapterServer`:
``app`` (the FastAPI app's wiring: routes, lifespan, serving in a thread), ``context`` (the
state its handlers share, its limits), ``protocol`` (request parameters, checked),
``prepare`` (a body made into scheduler requests), ``responses`` (JSON and SSE answers),
``logprobs`` (their shapes), ``errors`` and ``auth`` (OpenAI-shaped refusals, the API key)
and ``http`` (uvicorn: the guarded protocol and its settings)."""
