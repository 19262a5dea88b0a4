"""Hostile input: one line `error: …` (never `internal error`), bounded work, nothing stored changed."""

from __future__ import annotations

import pytest

from helpers import snapshot, write_adapter


@pytest.fixture
def populated(cli, home, tmp_path):
    """A registry holding p0@1 so that damage would show."""
    assert cli("add", "p0", str(write_adapter(tmp_path / "p0")))[0] == 0
    return snapshot(home)


def refused(cli, home, before, *args, match: str, max_len: int = 400) -> str:
    code, out, err = cli(*args)
    assert code != 0, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:2000]
    assert "internal error" not in lines[0] and "Traceback" not in err, lines[0]
    assert match in lines[0], lines[0]
    assert len(lines[0]) <= max_len, len(lines[0])
    if before is not None:
        assert snapshot(home) == before
    return lines[0]


# ------------------------------------------------------------------ references
@pytest.mark.parametrize(
    "ref, match",
    [
        ("p0@²", "invalid reference 'p0@²'"),
        ("p0@٣", "invalid reference 'p0@٣'"),  # not version 3: only ASCII digits are versions
        ("p0@99999999999999999999999", "no version is that large"),
        ("p0@" + "9" * 5000, "no version is that large"),
        ("p" * 10_000, "invalid adapter name"),
    ],
)
def test_hostile_references(cli, home, populated, ref, match):
    for command in (("show", ref), ("switch", ref), ("tag", ref, "prod"), ("rm", ref)):
        refused(cli, home, populated, *command, match=match)
