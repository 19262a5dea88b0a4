"""Multi-adapter serving: one base in memory, many LoRA adapters, a different one per request.

- :mod:`.stacks` — the stacked per-layer LoRA weights (one gather, two batched matmuls).
- :mod:`.server` — :class:`AdapterServer`: the base, the adapter slots and their LRU cache.
- :mod:`.peft_fallback` — PEFT's own path, and all PEFT knows about what it cannot mix.
- :mod:`.scheduler` — continuous batching: requests join and leave the running batch per step.
- :mod:`.openai` — the OpenAI-compatible HTTP app: request protocol, jobs, app.
"""

from adaptr.serving.server import AdapterServer

__all__ = ["AdapterServer"]
