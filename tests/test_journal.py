"""registry.journal: manifests and state.json beside the index; damage is found and repaired,
removed numbers are never reused."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from adaptr.errors import IntegrityError
from adaptr.registry import Registry

from helpers import refused, snapshot, write_adapter


def test_a_truncated_manifest_is_found_repaired_and_never_freed(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("m", write_adapter(tmp_path / "a"))
    reg.add("m", write_adapter(tmp_path / "b", seed=1))
    manifest = home / "manifests" / "m" / "2.json"
    whole = manifest.read_text()
    os.truncate(manifest, 100)
    code, out, err = cli("verify")
    assert code == 6 and "m@2: manifest" in err and "unreadable" in err, err
    # with the index intact, reindex rewrites the manifest from it
    code, out, err = cli("reindex")
    assert code == 0 and "rewrote the damaged or missing manifest of m@2" in err, err
    assert json.loads(manifest.read_text()) == json.loads(whole)
    assert Registry(home).verify().ok


def test_a_damaged_manifest_after_an_index_loss_blocks_gc(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("m", write_adapter(tmp_path / "a"))
    reg.add("m", write_adapter(tmp_path / "b", seed=1))
    os.truncate(home / "manifests" / "m" / "2.json", 100)
    (home / "registry.db").unlink()
    blobs = sorted((home / "blobs").rglob("*/*"))
    code, out, err = cli("reindex")
    assert code == 6 and "BAD  m@2: manifest" in err and "not restored" in err, err
    before = snapshot(home)
    line = refused(cli, home, before, "gc", match="gc refused: 1 version manifest(s)")
    assert "m@2" in line
    assert sorted((home / "blobs").rglob("*/*")) == blobs
    # m@2's number is still taken: the next add is m@3
    assert Registry(home).add("m", write_adapter(tmp_path / "c", seed=2)).ref == "m@3"


def test_garbage_state_is_reported_and_taken_from_the_index(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"), tags=["prod"])
    reg.switch("a@prod")
    (home / "state.json").write_text("{not json")
    code, out, err = cli("verify")
    assert code == 6 and "state.json is unreadable" in err, err
    code, out, err = cli("reindex")
    assert code == 0 and "taken from the old index" in err, err
    reg = Registry(home)
    assert reg.get("a@prod").active and reg.active() == {"": ["a@prod"]}
    assert json.loads((home / "state.json").read_text())["tags"] == [["a", "prod", 1]]


def test_garbage_state_with_the_index_lost_is_refused_unless_forced(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"))
    reg.add("a", write_adapter(tmp_path / "b", seed=1), tags=["prod"])
    reg.remove("a@2", force=True)
    (home / "state.json").write_text('{"names": "garbage"}')
    (home / "registry.db").unlink()
    before = snapshot(home)
    line = refused(cli, home, before, "reindex", match="state.json is damaged")
    assert "--force" in line
    code, out, err = cli("reindex", "--force")
    assert code == 0, err
    # the removed a@2 left a tombstone: its number is not given out again
    assert Registry(home).add("a", write_adapter(tmp_path / "c", seed=2)).ref == "a@3"


def test_removed_numbers_survive_the_loss_of_index_and_state(home, tmp_path):
    reg = Registry(home)
    for seed in range(3):
        reg.add("x", write_adapter(tmp_path / f"s{seed}", seed=seed))
    reg.remove("x@3")
    reg.remove("x@2")
    (home / "registry.db").unlink()
    (home / "state.json").unlink()
    with pytest.raises(IntegrityError, match="state.json is missing"):
        reg.reindex()
    reg.reindex(force=True)
    assert reg.add("x", write_adapter(tmp_path / "n", seed=9)).ref == "x@4"


def test_add_never_reuses_a_number_the_journal_holds(home, tmp_path):
    """An index whose counter went back (restored from a backup) cannot hand out a number
    whose manifest exists: the manifest is never overwritten."""
    reg = Registry(home)
    reg.add("q", write_adapter(tmp_path / "a"))
    reg.add("q", write_adapter(tmp_path / "b", seed=1))
    first = (home / "manifests" / "q" / "2.json").read_bytes()
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("DELETE FROM files WHERE version_id IN (SELECT id FROM versions WHERE version=2)")
    conn.execute("DELETE FROM versions WHERE version=2")
    conn.execute("UPDATE names SET next_version=2")
    conn.commit()
    conn.close()
    reg2 = Registry(home)
    assert reg2.add("q", write_adapter(tmp_path / "c", seed=2)).ref == "q@3"
    assert (home / "manifests" / "q" / "2.json").read_bytes() == first
