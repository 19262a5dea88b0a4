"""The local web UI of ``adaptr ui``: the registry's pages, curves, compare, a playground.

Everything it serves is in the package (Jinja2 templates, vendored htmx and uPlot, a small
CSS file): no build step and nothing fetched at run time. Importing it (and building the
app) loads neither torch nor transformers: the playground's engine, an
:class:`~adaptr.serving.AdapterServer`, is created the first time it is used (see
:class:`~adaptr.ui.context.UIContext`).
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """:func:`adaptr.ui.app.create_app` (imported on first call)."""
    from adaptr.ui.app import create_app as make

    return make(*args, **kwargs)
