"""adaptr.registry: the store of named, versioned, tagged adapters (no torch needed)."""

from adaptr.registry.models import AdapterVersion, BaseRecord, GcReport, StoredFile, VerifyReport
from adaptr.registry.refs import Ref, check_name
from adaptr.registry.registry import Registry, default_home

__all__ = [
    "AdapterVersion", "BaseRecord", "GcReport", "Ref", "Registry", "StoredFile", "VerifyReport",
    "check_name", "default_home",
]  # fmt: skip
