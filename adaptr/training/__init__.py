"""Training: recipe, trainer, callbacks, preview, LoRA settings."""
