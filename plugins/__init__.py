"""adaptr.plugins: the built-in plugins (model families and dataset formatters)."""
