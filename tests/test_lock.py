"""registry.lock: a writer that cannot get the lock says so in one line and stores nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from adaptr.registry import Registry

from helpers import run_adaptr, snapshot


def test_a_held_lock_times_out_with_one_line(home, adapter_dir):
    """A writer that cannot get the lock says so and stores nothing."""
    reg = Registry(home)
    reg.add("a", adapter_dir)
    before = snapshot(home)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(home / "lock")!r}, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            time.sleep(30)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_adaptr("add", "a", str(adapter_dir), home=home, env={"ADAPTR_LOCK_TIMEOUT": "0.3"})
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"error: another adaptr process has held the writer lock on {home} for 0.3s; "
        "wait for it to finish (or raise ADAPTR_LOCK_TIMEOUT)"
    ]
    assert snapshot(home) == before
    assert reg.add("a", adapter_dir).version == 2  # the lock is free again once its holder dies
