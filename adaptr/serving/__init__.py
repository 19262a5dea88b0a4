"""Multi-adapter serving: one base in memory, many LoRA adapters, a different one per request.

- :mod:`.requests` — what a completion asks and gets back (Request, Sampling, ServedAdapter).
- :mod:`.text` — incremental detokenizing and stop strings.
- :mod:`.stacks` — the stacked per-layer LoRA weights (one gather, two batched matmuls).
- :mod:`.slots` — residency: which adapters are in memory, in which slot, LRU eviction.
- :mod:`.peft_fallback` — PEFT's own path, and all PEFT knows about what it cannot mix.
- :mod:`.batch` — the running batch's rows and their left-padded KV cache.
- :mod:`.scheduler` — continuous batching over a narrow :class:`~.scheduler.Engine`.
- :mod:`.server` — :class:`AdapterServer`: the base, its adapters, and its one scheduler.
- :mod:`.openai` — the OpenAI-compatible HTTP app; :mod:`.vllm` — vLLM as the engine.
"""

from adaptr.serving.server import AdapterServer

__all__ = ["AdapterServer"]
