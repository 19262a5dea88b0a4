"""adaptr: a plugin-based LoRA adapter manager with an SFT trainer.

Importing ``adaptr`` is cheap: torch, transformers and peft load only when a feature that
needs them is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
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
    "hookimpl": "adaptr.hookspecs",
    "ModelFamily": "adaptr.families",
    "Formatter": "adaptr.formatters",
    "Registry": "adaptr.registry",
    "AdapterVersion": "adaptr.registry",
    "BaseRecord": "adaptr.registry",
    "Ref": "adaptr.registry",
    "evaluate": "adaptr.evaluation",
    "promote": "adaptr.evaluation",
}

if TYPE_CHECKING:  # pragma: no cover
    from .evaluation import evaluate, promote
    from .families import ModelFamily
    from .formatters import Formatter
    from .hookspecs import hookimpl
    from .registry import AdapterVersion, BaseRecord, Ref, Registry


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adaptr' has no attribute {name!r}")


__all__ = [
    "AdapterVersion", "AdaptrError", "BaseRecord", "ConflictError", "Formatter", "IncompatibleBaseError",
    "IntegrityError", "InvalidAdapterError", "InvalidInputError", "LockTimeoutError",
    "ModelFamily", "NotFoundError", "Ref", "Registry", "__version__", "evaluate", "hookimpl",
    "promote",
]  # fmt: skip
