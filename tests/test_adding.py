"""registry.adding: an add never half-writes: killed writers, concurrent writers, failures."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adaptr.registry import Registry
from adaptr.registry.blobs import hash_file

from helpers import snapshot, write_adapter

HELPERS = str(Path(__file__).parent)

# A writer that adds fresh adapters in a loop and says what it did; the test kills it.
# Each record is one os.write of a whole line, so a kill (even with PYTHONUNBUFFERED set,
# where print() writes each argument apart) never leaves half a record in the pipe.
# With a phase ("blobs.adopt", "journal.place:before", …) the writer stops inside
# that step of an add on its N-th call and says "inside": the kill lands there for sure.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {helpers!r})
    from pathlib import Path
    from helpers import write_adapter
    from adaptr.registry import Registry
    reg, work, seed = Registry({home!r}), Path({work!r}), {seed}
    reg.list()
    say = lambda *words: os.write(1, (" ".join(map(str, words)) + "\\n").encode())
    phase, nth = {phase!r}, {nth}
    if phase:
        where, _, when = phase.partition(":")
        owner, attr = where.split(".")
        obj = getattr(reg, owner)
        real, calls = getattr(obj, attr), [0]
        def hooked(*a, **k):
            calls[0] += 1
            stop = calls[0] == nth
            if stop and when == "before":
                say("inside", phase); time.sleep(600)
            out = real(*a, **k)
            if stop:
                say("inside", phase); time.sleep(600)
            return out
        setattr(obj, attr, hooked)
    say("ready")
    for i in range(1000):
        src = write_adapter(work / f"s{{seed}}-{{i}}", r=32, hidden=1024, seed=seed * 1000 + i,
                            extra_files={{"README.md": f"seed {{seed}} step {{i}}"}})
        say("start", src)
        v = reg.add("victim", src, tags=["last"])
        say("done", v.ref, src)
    """
)
# Where the deterministic kills land: each step of an add (3 files per adapter), on
# a later add each time, so every trial has whole versions before the kill.
PHASES = [
    ("blobs.stage", 2), ("blobs.adopt", 5), ("journal.begin_add", 2),
    ("journal.place:before", 3), ("journal.place", 2), ("journal.write_state", 4),
]  # fmt: skip


def _expected_hashes(src: Path) -> dict[str, str]:
    return {p.name: hash_file(p)[0] for p in src.iterdir()}


def test_sigkill_during_add_never_leaves_a_partial_version(tmp_path):
    home = tmp_path / "home"
    rng = random.Random(1234)
    done: dict[str, Path] = {}  # ref -> source, for every add that returned
    started: list[Path] = []
    trials = 30
    for trial in range(trials):
        # every third kill at a random instant (anywhere), the others inside a chosen step
        phase, nth = PHASES[trial % len(PHASES)] if trial % 3 else ("", 0)
        code = WRITER.format(
            helpers=HELPERS, home=str(home), work=str(tmp_path / "src"), seed=trial,
            phase=phase, nth=nth,
        )  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline().strip()
        assert first == "ready", f"trial {trial}: writer did not start: {first!r}"
        lines = []
        if phase:
            while not (line := proc.stdout.readline()).startswith("inside"):
                assert line, f"trial {trial}: the writer ended before reaching {phase}"
                lines.append(line)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
        out = "".join(lines) + out
        assert proc.returncode == -signal.SIGKILL
        for line in out.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # cannot happen with one write per record; never trust a torn line
            kind, *rest = line.split()
            if kind == "done":
                done[rest[0]] = Path(rest[1])
            elif kind == "start":
                started.append(Path(rest[0]))

        reg = Registry(home)
        report = reg.verify()
        assert report.ok, f"trial {trial}: {report.problems}; writer said {out[-500:]!r}"
        stored = reg.list("victim") if (home / "registry.db").exists() and reg.list() else []
        refs = {v.ref for v in stored}
        assert set(done) <= refs, (
            f"trial {trial}: an add that returned was lost: {set(done) - refs}"
        )
        sources = {str(s) for s in started}
        for v in stored:
            src = done.get(v.ref) or Path(v.source)
            assert str(src) in sources
            assert {f.path: f.sha256 for f in v.files} == _expected_hashes(src), (
                f"{v.ref} is partial"
            )
        versions = [v.version for v in stored]
        assert versions == list(range(1, len(versions) + 1))
        if stored:
            assert reg.get("victim@last").version == versions[-1]
    assert len(done) >= 20 and len(started) - len(done) >= 20  # by construction of PHASES
    reg = Registry(home)
    reg.gc()
    assert reg.verify().ok
    referenced = {f.sha256 for v in reg.list() for f in v.files}
    assert set(reg.blobs.digests()) == referenced
    assert not any((home / "tmp").iterdir())


CONCURRENT = textwrap.dedent(
    """
    import sys, json, time
    sys.path.insert(0, {helpers!r})
    from pathlib import Path
    from helpers import write_adapter
    from adaptr.registry import Registry
    reg = Registry({home!r})
    srcs = [write_adapter(Path({work!r}) / f"w{{{worker}}}-{{i}}", seed={worker} * 100 + i) for i in range({n})]
    Path({work!r}, "ready-{worker}").touch()
    while not Path({work!r}, "go").exists():  # all start adding together (no busy-wait)
        time.sleep(0.005)
    refs = [reg.add("shared", s).ref for s in srcs] + [reg.add("own-{worker}", srcs[0]).ref]
    print(json.dumps(refs))
    """
)


def test_concurrent_writers_get_unique_consecutive_versions(tmp_path):
    home, work, workers, n = tmp_path / "home", tmp_path / "work", 4, 6
    work.mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT.format(
                    helpers=HELPERS, home=str(home), work=str(work), worker=w, n=n, workers=workers
                ),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for w in range(workers)
    ]
    deadline = time.monotonic() + 300
    while len(list(work.glob("ready-*"))) < workers:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (work / "go").touch()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        results.append(json.loads(out))
    shared = [r for refs in results for r in refs if r.startswith("shared@")]
    assert len(shared) == len(set(shared)) == workers * n
    reg = Registry(home)
    assert [v.version for v in reg.list("shared")] == list(range(1, workers * n + 1))
    assert {v.ref for v in reg.list("shared")} == set(shared)
    for w in range(workers):
        assert [v.version for v in reg.list(f"own-{w}")] == [1]
    assert reg.verify().ok


def test_a_failure_before_commit_stores_nothing(home, tmp_path, monkeypatch):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"))
    before = snapshot(home)["tables"]
    from adaptr.registry import index

    real = index.transaction
    calls = {"n": 0}

    def failing(conn):
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index, "transaction", failing)
    with pytest.raises(OSError):
        reg.add("a", write_adapter(tmp_path / "b", seed=5))
    monkeypatch.setattr(index, "transaction", real)
    assert calls["n"] == 1
    assert snapshot(home)["tables"] == before
    assert reg.verify().ok and [v.version for v in reg.list("a")] == [1]
    assert (
        reg.gc().blobs_removed == 1
    )  # the failed add's new weights (its config was already stored)
    assert reg.add("a", write_adapter(tmp_path / "c", seed=6)).version == 2


