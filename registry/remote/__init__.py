"""A registry home on an S3-compatible object store (``s3://BUCKET/PREFIX``).

The store is the truth; each machine keeps a full local registry as its replica and cache
(``$ADAPTR_CACHE/<hash>/`` or ``~/.cache/adaptr/remote/<hash>/``), so every command runs
on a local :class:`~adaptr.registry.Registry` that is brought up to date from the store
before it reads (at most ``$ADAPTR_REMOTE_TTL`` seconds old, default 2) and before every
write, and whose writes go to the store first with conditional puts. See ``layout.py``
for the objects and ``remote.py`` for the protocols.

This module is cheap to import: obstore loads only when a remote home is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = "remote.json"  # in a replica's folder: the store it mirrors


def is_url(home: object) -> bool:
    return isinstance(home, str) and home.strip().lower().startswith("s3://")


def remote_class(home: object) -> type | None:
    """The registry class for ``home`` when it is a store (an ``s3://`` address, or the
    replica folder of one), else None; without importing obstore for a local home."""
    if home is None:
        home = os.environ.get("ADAPTR_HOME") or None
    if home is None:
        return None
    if is_url(home) or _is_replica(home):
        # looked up by name, as a backend: RemoteRegistry subclasses Registry, whose
        # constructor calls this, so a static import here would tie the two modules in a knot
        import importlib

        return importlib.import_module(f"{__name__}.remote").RemoteRegistry
    return None


def _is_replica(home: object) -> bool:
    try:
        return (Path(home).expanduser() / MARKER).is_file()  # type: ignore[arg-type]
    except (TypeError, ValueError, OSError):
        return False


def checkpoint(name: str) -> None:
    """Test hook: stop here (``$ADAPTR_REMOTE_CHECKPOINT`` = name) and say so in a file, so a
    test can SIGKILL the process at exactly this point of a write."""
    if os.environ.get("ADAPTR_REMOTE_CHECKPOINT") == name:
        import time

        flag = os.environ.get("ADAPTR_REMOTE_CHECKPOINT_FILE")
        if flag:
            Path(flag).write_text(str(os.getpid()))
        time.sleep(float(os.environ.get("ADAPTR_REMOTE_CHECKPOINT_WAIT", "600")))
