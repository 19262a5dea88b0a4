"""adaptr: a plugin-based LoRA adapter manager with an SFT trainer.

Importing ``adaptr`` is cheap: torch, transformers and peft load only when a feature that
needs them is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from adaptr.errors import (
    AdaptrError,
    ConflictError,
    IncompatibleBaseError,
    IntegrityError,
    InvalidAdapterError,
    InvalidInputError,
    LockTimeoutError,
    NotFoundError,
)

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "adaptr.extend.hookspecs",
    "ModelFamily": "adaptr.extend.types",
    "Formatter": "adaptr.extend.types",
    "MissingField": "adaptr.extend.types",
    "need": "adaptr.extend.types",
    "family_for": "adaptr.extend.catalog",
    "Registry": "adaptr.registry",
    "AdapterVersion": "adaptr.registry",
    "BaseRecord": "adaptr.registry",
    "Ref": "adaptr.registry",
    "evaluate": "adaptr.evaluation.run",
    "promote": "adaptr.evaluation.gates",
}

if TYPE_CHECKING:  # pragma: no cover
    from adaptr.evaluation.gates import promote
    from adaptr.evaluation.run import evaluate
    from adaptr.extend.catalog import family_for
    from adaptr.extend.hookspecs import hookimpl
    from adaptr.extend.types import Formatter, MissingField, ModelFamily, need
    from adaptr.registry import AdapterVersion, BaseRecord, Ref, Registry


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adaptr' has no attribute {name!r}")


__all__ = [
    "AdapterVersion", "AdaptrError", "BaseRecord", "ConflictError", "Formatter", "IncompatibleBaseError",
    "IntegrityError", "InvalidAdapterError", "InvalidInputError", "LockTimeoutError",
    "MissingField", "ModelFamily", "NotFoundError", "Ref", "Registry", "__version__", "evaluate",
    "family_for", "hookimpl", "need", "promote",
]  # fmt: skip
