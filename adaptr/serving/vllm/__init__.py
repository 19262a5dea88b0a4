"""adaptr's registry as the source of adapters for a vLLM server.

- :mod:`.compat` — what vLLM cannot serve (DoRA, modules_to_save, LoRA biases, trainable
  tokens, LoRA on embeddings, a rank above ``--max-lora-rank``), as reasons.
- :mod:`.source` — refs to checked PEFT folders of links to the stored blobs (no vLLM needed).
- :mod:`.plugin` — the ``vllm.general_plugins`` entry point: the LoRA resolver vLLM consults.
- :mod:`.launch` — the ``vllm`` command line ``adaptr serve --engine vllm`` runs.

Nothing here imports torch or PEFT; :mod:`.plugin` imports vLLM, and runs only inside it.
"""
