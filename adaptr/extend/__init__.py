"""The plugin system: types (a leaf), hookspecs, the manager, look-ups."""
