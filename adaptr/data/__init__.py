"""Data: files -> records -> chat -> TRL examples."""
