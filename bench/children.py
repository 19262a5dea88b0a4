"""What the bench scripts share: each measured side runs in a child process of its own (a fresh
interpreter, so one side's memory and threads never weigh on the other), which prints its
figures as one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


def run_child(script: str, spec: dict) -> dict:
    """Run ``script --child SPEC`` and return the figures its RESULT line holds."""
    r = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"bench child failed:\n{r.stderr[-3000:]}")
    return json.loads(line[7:])


def med(runs: list[dict], key: str) -> float:
    """The median of ``key`` over the runs."""
    return statistics.median(r[key] for r in runs)
