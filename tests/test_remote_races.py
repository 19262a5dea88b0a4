"""Several real processes (each its own cache: another machine) against one SeaweedFS:
concurrent adds and tag moves, SIGKILL at chosen points of an add, gc racing an add."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from adaptr.registry.remote.remote import RemoteRegistry

import remote_helpers
from helpers import run_adaptr, write_adapter
from remote_helpers import S3Home

seaweed, s3_home = remote_helpers.seaweed, remote_helpers.s3_home  # the fixtures

WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[3])
    from helpers import write_adapter
    from pathlib import Path
    from adaptr.errors import ConflictError
    from adaptr.registry import Registry

    me, n = int(sys.argv[1]), int(sys.argv[2])
    reg = Registry()
    added, moves, conflicts = [], 0, 0
    for i in range(n):
        src = write_adapter(Path(sys.argv[4]) / f"w{me}-{i}", seed=1000 * me + i)
        v = reg.add("shared", src)
        added.append(v.version)
        for _ in range(50):  # the loser of a tag race is told, and tries again
            try:
                reg.tag(v.ref, "prod")
                moves += 1
                break
            except ConflictError:
                conflicts += 1
    print(json.dumps({"added": added, "moves": moves, "conflicts": conflicts}))
    """
)


def _spawn(home: S3Home, tmp_path, me: int, n: int) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = home.env(cache=tmp_path / f"cache-{me}")
    tests = os.path.dirname(__file__)
    return subprocess.Popen(
        [sys.executable, str(script), str(me), str(n), tests, str(tmp_path / "src")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_concurrent_adds_and_tag_moves_lose_and_duplicate_nothing(s3_home, tmp_path):
    procs, n = 8, 25
    workers = [_spawn(s3_home, tmp_path, me, n) for me in range(procs)]
    results = []
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    numbers = [v for r in results for v in r["added"]]
    assert len(numbers) == procs * n and len(set(numbers)) == procs * n  # no duplicate
    assert sorted(numbers) == list(range(1, procs * n + 1))  # no gap: nothing lost
    assert sum(r["moves"] for r in results) == procs * n  # every move landed once, or was retried
    fresh = RemoteRegistry(s3_home.url, cache=tmp_path / "auditor")
    listed = fresh.list("shared")
    assert [v.version for v in listed] == sorted(numbers)
    prod = fresh.get("shared@prod")
    assert prod.version in numbers and fresh.verify().ok
    for r in results:  # each process's own adds are all there, on the store
        assert set(r["added"]) <= {v.version for v in listed}


def _checkpointed_add(
    home: S3Home, tmp_path, point: str, src, cache
) -> tuple[subprocess.Popen, str]:
    flag = tmp_path / f"at-{point}"
    env = home.env(
        cache=cache,
        ADAPTR_REMOTE_CHECKPOINT=point,
        ADAPTR_REMOTE_CHECKPOINT_FILE=str(flag),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "from adaptr.cli import run; run()", "add", "foo", str(src)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the add never reached its checkpoint"
        time.sleep(0.05)
    return proc, str(flag)


def test_sigkill_after_the_blobs_before_the_manifest_leaves_nothing_visible(s3_home, tmp_path):
    src = write_adapter(tmp_path / "s", seed=7)
    cache = tmp_path / "machine-a"
    proc, _ = _checkpointed_add(s3_home, tmp_path, "after-blobs", src, cache)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = RemoteRegistry(s3_home.url, cache=tmp_path / "machine-b").store
    assert store.list("blobs/sha256/") and not store.list("versions/")  # uploaded, unpublished
    for c in (cache, tmp_path / "machine-b"):  # the killed machine's cache too: nothing blocks
        env = s3_home.env(cache=c)
        r = run_adaptr("list", "--json", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["adapters"] == [], r.stderr
    r = run_adaptr("add", "foo", str(src), env=s3_home.env(cache=cache))
    assert r.returncode == 0 and r.stdout.strip() == "foo@1", r.stderr  # the number was never taken
    assert RemoteRegistry(s3_home.url, cache=tmp_path / "c").verify().ok


def test_sigkill_after_the_manifest_leaves_the_whole_version(s3_home, tmp_path):
    src = write_adapter(tmp_path / "s", seed=8)
    cache = tmp_path / "machine-a"
    proc, _ = _checkpointed_add(s3_home, tmp_path, "after-manifest", src, cache)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for c in (cache, tmp_path / "machine-b"):  # published: whole on every machine
        reg = RemoteRegistry(s3_home.url, cache=c)
        assert [v.ref for v in reg.list()] == ["foo@1"]
        assert reg.verify().ok
    r = run_adaptr(
        "add", "foo", str(write_adapter(tmp_path / "t", seed=9)), env=s3_home.env(cache=cache)
    )
    assert r.stdout.strip() == "foo@2", r.stderr


def test_gc_never_deletes_a_blob_an_add_is_uploading_and_reaps_the_rest(s3_home, tmp_path):
    grace = 2.0
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    src = write_adapter(tmp_path / "s", seed=3)
    old = a.add("foo", src)
    a.remove("foo@1")
    time.sleep(grace + 1)  # foo@1's blobs: unreferenced and older than the grace period
    # an add of the same content pauses after finding its blobs on the store (markers written)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from adaptr.cli import run; run()", "add", "foo", str(src)],
        env=s3_home.env(
            cache=tmp_path / "b", ADAPTR_REMOTE_CHECKPOINT="after-blobs",
            ADAPTR_REMOTE_CHECKPOINT_FILE=str(tmp_path / "flag"), ADAPTR_REMOTE_CHECKPOINT_WAIT="3",
            PYTHONFAULTHANDLER="1",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "flag").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    report = a.gc(grace=grace)  # meanwhile: the blobs are marked, so kept
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        raise AssertionError(proc.communicate()[1][-4000:]) from None
    assert proc.returncode == 0 and out.strip() == "foo@2", err
    assert report.blobs_removed == 0
    assert set(report.store.kept) == {f.sha256 for f in old.files}  # kept for their markers
    c = RemoteRegistry(s3_home.url, cache=tmp_path / "c")
    assert c.verify().ok
    assert c.export("foo@2", tmp_path / "out").is_dir()
    digests = {f.sha256 for f in old.files}
    # once the markers are past the grace too, an unreferenced blob goes
    c.remove("foo@2")
    time.sleep(grace + 1)
    c.gc(grace=grace)
    left = {m.key.rpartition("/")[2] for m in c.store.list("blobs/sha256/")}
    assert not digests & left and not c.store.list("uploads/")


def test_gc_keeps_what_manifests_reference_and_young_blobs(s3_home, tmp_path):
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    kept = a.add("foo", write_adapter(tmp_path / "s1", seed=1))
    a.add("foo", write_adapter(tmp_path / "s2", seed=2))
    a.remove("foo@2")
    report = a.gc(grace=3600)  # foo@2's blobs are young: kept
    assert report.blobs_removed == 0
    time.sleep(1.5)
    a.gc(grace=1)
    left = {m.key.rpartition("/")[2] for m in a.store.list("blobs/sha256/")}
    assert left == {f.sha256 for f in kept.files}
    assert RemoteRegistry(s3_home.url, cache=tmp_path / "b").verify().ok


def test_gc_grace_through_the_cli(s3_home, tmp_path, cli, monkeypatch):
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    a.add("foo", write_adapter(tmp_path / "s1", seed=1))
    a.add("foo", write_adapter(tmp_path / "s2", seed=2))
    a.remove("foo@2")
    monkeypatch.setenv("ADAPTR_HOME", s3_home.url)
    code, out, err = cli("gc")  # the default grace (an hour): the young blob stays
    assert code == 0 and out.startswith("removed 0 unreferenced"), (out, err)
    time.sleep(1.5)
    code, out, err = cli("gc", "--grace", "1")
    assert code == 0 and out.startswith("removed 1 unreferenced"), (out, err)
    code, out, err = cli("gc", "--grace", "-1")
    assert code == 2 and err.startswith("error: --grace must be 0 or more"), err


def test_gc_grace_on_a_local_home_is_refused(tmp_path, cli):
    code, out, err = cli("--home", str(tmp_path / "h"), "gc", "--grace", "5")
    assert code == 2 and "--grace is for s3:// homes" in err, err


def test_sigkill_during_gc_deletes_only_unreferenced_blobs_and_a_rerun_finishes(s3_home, tmp_path):
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    kept = a.add("foo", write_adapter(tmp_path / "k", seed=1))
    for seed in (2, 3, 4):
        a.add("gone", write_adapter(tmp_path / f"g{seed}", seed=seed))
    a.remove("gone", all_versions=True)
    time.sleep(1.5)  # older than the grace below
    flag = tmp_path / "at-gc"
    env = s3_home.env(cache=tmp_path / "b", ADAPTR_REMOTE_CHECKPOINT="gc-after-delete",
                      ADAPTR_REMOTE_CHECKPOINT_FILE=str(flag))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", "from adaptr.cli import run; run()", "gc", "--grace", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "gc never reached its checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # after its first delete
    proc.wait(timeout=30)
    left = {m.key.rpartition("/")[2] for m in a.store.list("blobs/sha256/")}
    assert {f.sha256 for f in kept.files} <= left  # nothing referenced went
    assert len(left) > len(kept.files)  # it was stopped part-way
    fresh = RemoteRegistry(s3_home.url, cache=tmp_path / "c")
    assert fresh.verify().ok and fresh.get("foo@1").ref == "foo@1"
    assert fresh.store.list("trash/")  # the killed gc's copy of the blob it was deleting
    fresh.gc(grace=1)  # a rerun finishes the job
    left = {m.key.rpartition("/")[2] for m in a.store.list("blobs/sha256/")}
    assert left == {f.sha256 for f in kept.files} and not fresh.store.list("trash/")


def test_an_add_that_takes_a_blob_while_gc_deletes_it_gets_it_back(s3_home, tmp_path, monkeypatch):
    """The narrowest interleaving: gc found the blob unreferenced and unmarked, then a whole
    add (marker, HEAD: still there, manifest) runs before gc's DELETE lands."""
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    src = write_adapter(tmp_path / "s", seed=5)
    old = a.add("old", src)
    a.remove("old@1")
    time.sleep(1.5)  # the blob is older than the grace
    weights = next(f.sha256 for f in old.files if f.path == "adapter_model.safetensors")
    real_delete, added = a.store.delete, []

    def delete_after_an_add(key):
        if key.endswith(weights) and key.startswith("blobs/") and not added:
            other = RemoteRegistry(s3_home.url, cache=tmp_path / "b")
            added.append(other.add("new", src))  # dedupes onto the blob, still there
        real_delete(key)

    monkeypatch.setattr(a.store, "delete", delete_after_an_add)
    report = a.gc(grace=1)
    assert added and weights in report.store.kept
    c = RemoteRegistry(s3_home.url, cache=tmp_path / "c")
    assert c.verify().ok, c.verify().problems
    assert (
        c.read_checked(c.get("new@1"), "adapter_model.safetensors")
        == (src / "adapter_model.safetensors").read_bytes()
    )
    assert not c.store.list("trash/")
