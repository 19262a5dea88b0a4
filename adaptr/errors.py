"""The exceptions adaptr raises; the CLI maps each to a one-line ``error: …`` message.

Every message says what is wrong and what to do about it, so the CLI prints ``str(exc)``
as it is. Library callers catch :class:`AdaptrError` for all of them.
"""

from __future__ import annotations

import reprlib
from typing import Any

BRIEF_LIMIT = 80


def brief(value: Any, limit: int = BRIEF_LIMIT) -> str:
    """A short ``repr`` of a user-given value for a message: at most ``limit`` characters.

    Bounded work whatever the value (huge strings, deep or self-referencing structures):
    ``reprlib`` abbreviates containers, and what is still too long is cut with "…".
    """
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, 2 * limit, limit, 2 * limit
    for attr in (
        "maxtuple",
        "maxlist",
        "maxarray",
        "maxdict",
        "maxset",
        "maxfrozenset",
        "maxdeque",
    ):
        setattr(short, attr, 6)
    if isinstance(value, int) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    if isinstance(value, (str, bytes)):
        value = value[: limit + 1]  # the cut below marks it
    try:
        text = short.repr(value)
    except Exception:  # a hostile __repr__: say what it is, not what it claims
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split()) if any(c in text for c in "\n\r\t") else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip(text: str, limit: int = BRIEF_LIMIT) -> str:
    """``text`` (an exception's message…) on one line, cut to ``limit`` characters with "…"."""
    text = " ".join(str(text)[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, clipped (empty if it has none)."""
    lines = str(exc).strip().splitlines()
    return clip(lines[0], limit) if lines else type(exc).__name__


class AdaptrError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1


class InvalidInputError(AdaptrError, ValueError):
    """A malformed argument: a bad name, reference, option value or file."""

    exit_code = 2


class NotFoundError(AdaptrError, LookupError):
    """An adapter, version, tag or base that the registry does not hold."""

    exit_code = 3


class InvalidAdapterError(InvalidInputError):
    """A source folder that is not a usable PEFT adapter (missing, corrupt, pickle-only…)."""


class IncompatibleBaseError(AdaptrError):
    """An adapter that does not fit the base model it is attached to."""

    exit_code = 4


class ConflictError(AdaptrError):
    """An action that would overwrite or orphan something; repeat it with ``--force``."""

    exit_code = 5


class IntegrityError(AdaptrError):
    """Stored data that no longer matches its recorded hash, or a damaged index."""

    exit_code = 6


class StorageFullError(AdaptrError, OSError):
    """The file system (or object store) ran out of space or quota during a write.

    The write was undone: the message names where space ran out and what was kept. An
    ``OSError`` with ``errno.ENOSPC`` too, for callers that catch those.
    """

    def __init__(self, message: str):
        import errno

        super().__init__(message)
        self.errno = errno.ENOSPC

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LockTimeoutError(AdaptrError):
    """Another adaptr process has held the registry's writer lock for too long."""

    exit_code = 7


class PluginError(AdaptrError):
    """A plugin failed in one of its hooks, or answered something adaptr cannot use.

    ``plugin`` and ``hook`` name where; the message says what it raised and what to do.
    """

    def __init__(self, message: str, plugin: str, hook: str):
        super().__init__(message)
        self.plugin, self.hook = plugin, hook


class PluginConflictError(AdaptrError):
    """Two plugins register a family or formatter of the same name."""


class InterruptedAfterStore(KeyboardInterrupt):
    """Ctrl-C (a KeyboardInterrupt) in a plugin's event hook after a version was committed.

    A KeyboardInterrupt, so whatever stops on Ctrl-C still stops; unlike a bare one it says
    that ``ref`` IS stored, so that nobody adds it again.
    """

    exit_code = 130

    def __init__(self, ref: str, where: str):
        self.ref, self.where = ref, where
        super().__init__(
            f"interrupted in {where}, after {ref} was stored: {ref} is stored "
            f"(see `adaptr show {ref}`); do not add it again"
        )


def shadowing_package() -> str | None:
    """The folder Python imported as ``adaptr`` when it is not this package, else None.

    A folder named adaptr in the current directory (a checkout run from its parent folder)
    comes first on ``sys.path`` for ``python -m``/``-c``: then ``from adaptr import …`` fails
    while ``adaptr.cli``, ``adaptr.errors``… still load from the installed package.
    """
    import sys
    from pathlib import Path

    package = sys.modules.get(__name__.rpartition(".")[0])
    here = Path(__file__).resolve().parent
    init = getattr(package, "__file__", None)
    if package is None or (init and Path(init).resolve().parent == here):
        return None
    if init:
        return str(Path(init).parent)
    paths = list(getattr(package, "__path__", None) or [])
    return str(paths[0]) if paths else "?"
