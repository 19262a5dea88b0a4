"""The README's main job (examples/demo.py) runs end to end on the tiny local model."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` in a new interpreter, capturing its output.

    The demo takes ~4 min on an idle 2-core machine and can take 3x that on a busy one:
    the limit is for a hang, not a speed check.
    """
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(3200)
def test_demo_runs(tmp_path):
    r = run_example("demo.py", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "round-trips byte for byte and gives identical logits: True" in r.stdout
    assert "lineage: parents ['quotes@1']" in r.stdout
    assert "quotes@2" in r.stdout and "zh-en@1" in r.stdout and "removed quotes@1" in r.stdout
    assert "both@1" in r.stdout and "merged zh-en loads without PEFT" in r.stdout
    assert "mixed batch, translation exact match: base 0/24 -> zh-en" in r.stdout
    # the serving example runs on the demo's registry: each adapter does its own task
    r = run_example("multi_task_serving.py", "--home", str(tmp_path / "demo" / "registry"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[http] models: ['tiny-llama'" in r.stdout and "[http] zh-en" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quickstart_runs(tmp_path):
    r = run_example("quickstart.py", "--out", str(tmp_path / "qs"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "composed: blend@1 from ['zh-en@1', 'quotes@1'] by cat" in r.stdout
    assert "served zh-en" in r.stdout and "| verify: ok" in r.stdout
