"""Evaluation records of versions: what every home (local or on a store) stores for one."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence


def stamped(
    rows: Sequence[sqlite3.Row], records: Sequence[tuple[object, dict]]
) -> list[tuple[str, int, dict]]:
    """(name, version, record) per ``(ref, record)`` pair, ``rows`` being the versions the
    refs resolved to: each record gets its version's ``ref`` and, unless it has one, the
    time it is ``created``."""
    out = []
    for row, (_, record) in zip(rows, records, strict=True):
        rec = {**record, "ref": f"{row['name']}@{row['version']}"}
        rec.setdefault("created", time.time())
        out.append((row["name"], row["version"], rec))
    return out
