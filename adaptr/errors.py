"""The exceptions adaptr raises; the CLI maps each to a one-line ``error: …`` message.

Every message says what is wrong and what to do about it, so the CLI prints ``str(exc)``
as it is. Library callers catch :class:`AdaptrError` for all of them.
"""

from __future__ import annotations


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


class LockTimeoutError(AdaptrError):
    """Another adaptr process has held the registry's writer lock for too long."""

    exit_code = 7
