"""registry/faults.py: a full disk is one ``error:`` line and leaves the registry as it was —
on a real tmpfs that fills up, and with ENOSPC injected where a real disk cannot be made to
fail at that instant."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adaptr.errors import StorageFullError
from adaptr.registry import Registry

from helpers import refused, snapshot, write_adapter

ROOT = Path(__file__).parent.parent
ZH_EN = ROOT / "examples" / "data" / "translate_zh_en.jsonl"


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (needs root and mount; skipped where they are not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _large_adapter(path: Path, mib: int) -> Path:
    path.mkdir(parents=True)
    rows = mib * (1 << 20) // (4 * 4 * 32)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": np.ones((4, 32 * rows), dtype=np.float32),
         f"{key}.lora_B.weight": np.ones((32, 4), dtype=np.float32)},
        str(path / "adapter_model.safetensors"),
    )  # fmt: skip
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _fill(mnt: Path) -> None:
    """Take every free byte of the file system."""
    with open(mnt / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_add_on_a_full_tmpfs_is_one_line_and_stores_nothing(small_disk, tmp_path, cli, monkeypatch):
    home = small_disk / "home"
    monkeypatch.setenv("ADAPTR_HOME", str(home))
    assert cli("add", "a", str(write_adapter(tmp_path / "a")), "--tag", "prod")[0] == 0
    before = snapshot(home)
    line = refused(
        cli,
        home,
        before,
        "add",
        "a",
        str(_large_adapter(tmp_path / "big", 5)),
        match="no space left",
    )
    assert "nothing was stored" in line
    assert not list((home / "tmp").rglob("*.*")), "the failed add left staged files"
    assert Registry(home).verify().ok


def test_commands_on_a_full_tmpfs_say_so_and_never_advise_reindex(
    small_disk, tmp_path, cli, monkeypatch
):
    home = small_disk / "home"
    monkeypatch.setenv("ADAPTR_HOME", str(home))
    assert cli("add", "a", str(write_adapter(tmp_path / "a")))[0] == 0
    assert cli("add", "a", str(write_adapter(tmp_path / "b", seed=1)))[0] == 0
    _fill(small_disk)
    before = snapshot(home)
    for args in (("tag", "a@1", "prod"), ("rm", "a@2"), ("reindex",),
                 ("add", "b", str(write_adapter(tmp_path / "c", seed=2)))):  # fmt: skip
        code, out, err = cli(*args)
        if code == 0:  # a write that fit in the space SQLite had already
            continue
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and "internal error" not in line, (args, err)
        assert "no space left" in line and "reindex" not in line, (args, line)
    # reads answer, and nothing stored was lost
    code, out, err = cli("list")
    assert code == 0 and "a" in out, err
    assert sorted(before["files"]) == sorted(snapshot(home)["files"])
    (small_disk / "filler").unlink()
    assert cli("verify")[0] == 0
    assert [v.ref for v in Registry(home).list("a")][:1] == ["a@1"]


def test_an_injected_enospc_in_the_copy_is_one_line(home, tmp_path, cli, monkeypatch):
    assert cli("add", "a", str(write_adapter(tmp_path / "a")))[0] == 0
    before = snapshot(home)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    line = refused(cli, home, before, "add", "a", str(write_adapter(tmp_path / "b", seed=1)),
                   match="no space left on the device holding")  # fmt: skip
    assert "nothing was stored" in line


def test_a_short_write_on_a_full_disk_raises_instead_of_being_counted(tmp_path, monkeypatch):
    """Without a kernel copy, a write that stopped short was counted whole, and the hash then
    mapped bytes past the end (``internal error (ValueError: mmap length …)``)."""
    from adaptr.registry import blobs

    def no_kernel_copy(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    class FullDisk:
        written = 0

        def write(self, data):
            if self.written:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written = 16
            return 16  # a short write: the disk had 16 bytes left

        def fileno(self):
            return -1

    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    with open(src, "rb", buffering=0) as fin, pytest.raises(OSError) as e:
        blobs._copy_chunk(fin, FullDisk())
    assert e.value.errno == errno.ENOSPC


def test_a_full_disk_in_a_copy_is_not_mistaken_for_no_kernel_copy(tmp_path, monkeypatch):
    from adaptr.registry import blobs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    (tmp_path / "src").write_bytes(b"x" * 100)
    with (
        open(tmp_path / "src", "rb") as fin,
        open(tmp_path / "dst", "wb") as fout,
        pytest.raises(OSError) as e,
    ):
        blobs._copy_chunk(fin, fout)
    assert e.value.errno == errno.ENOSPC


def test_reindex_on_a_full_disk_keeps_the_old_index(home, tmp_path, cli, monkeypatch):
    assert cli("add", "a", str(write_adapter(tmp_path / "a")), "--tag", "prod")[0] == 0
    before = snapshot(home)
    from adaptr.registry import index

    real = index.connect

    def connect(db, create):
        if ".rebuild-" in db.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(db, create)

    with monkeypatch.context() as m:
        m.setattr(index, "connect", connect)
        refused(cli, home, before, "reindex", match="no space left")
    assert cli("show", "a@prod")[0] == 0  # every command still works, no second reindex needed
    assert cli("reindex")[0] == 0


def test_eval_stores_every_record_or_none(home, tmp_path, monkeypatch):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"))
    reg.add("b", write_adapter(tmp_path / "b", seed=1))
    from adaptr.registry import journal

    real, calls = journal.write_json, {"n": 0}

    def second_fails(path, doc, **kw):
        if "evals" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, doc, **kw)

    with monkeypatch.context() as m, pytest.raises(StorageFullError, match="nothing was stored"):
        m.setattr(journal, "write_json", second_fails)
        reg.add_evals([("a", {"metrics": {"loss": 1.0}}), ("b", {"metrics": {"loss": 2.0}})])
    assert reg.evals("a@1") == [] and reg.evals("b@1") == []
    assert not [p for p in (home / "manifests").rglob("*.part")]
    reg.add_evals([("a", {"metrics": {"loss": 1.0}}), ("b", {"metrics": {"loss": 2.0}})])
    assert len(reg.evals("a@1")) == 1 and len(reg.evals("b@1")) == 1


def test_train_keeps_what_it_trained_when_the_store_is_full(
    home, tmp_path, tiny_llama, cli, monkeypatch
):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Registry, "add", full)
        code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(ZH_EN), "--format", "alpaca",
                             "--name", "zh", "--max-steps", "2", "--batch-size", "2",
                             "--no-gradient-checkpointing")  # fmt: skip
        line = err.strip().splitlines()[-1]
        assert code != 0 and line.startswith("error: no space left"), err[-2000:]
        final = home / "runs" / "zh" / "final"
        assert f"adaptr add zh {final}" in line, line
        assert (final / "adapter_model.safetensors").is_file()
    assert cli("add", "zh", str(final), "--base", str(tiny_llama))[0] == 0
