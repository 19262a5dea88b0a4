"""The README's main job (examples/demo.py) runs end to end on the tiny local model, and the
README's tour of the CLI, run on the demo's registry, prints what the README shows."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
TOUR_MARK = "<!-- the tour: tests/test_demo.py runs these commands and compares their output -->"


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` in a new interpreter, capturing its output.

    The demo takes ~4 min on an idle 2-core machine and can take 3x that on a busy one:
    the limit is for a hang, not a speed check.
    """
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo's output folder (``demo-out`` in a fresh folder) and its run."""
    where = tmp_path_factory.mktemp("demo")
    return where / "demo-out", run_example("demo.py", "--out", str(where / "demo-out"))


@pytest.mark.slow
@pytest.mark.timeout(3200)
def test_demo_runs(demo):
    out, r = demo
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "round-trips byte for byte and gives identical logits: True" in r.stdout
    assert "lineage: parents ['quotes@1']" in r.stdout
    assert "quotes@2" in r.stdout and "zh-en@1" in r.stdout and "removed quotes@1" in r.stdout
    assert "both@1" in r.stdout and "merged zh-en loads without PEFT" in r.stdout
    assert "mixed batch, translation exact match: base 0/24 -> zh-en" in r.stdout
    # the serving example runs on the demo's registry: each adapter does its own task
    r = run_example("multi_task_serving.py", "--home", str(out / "registry"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[http] models: ['tiny-llama'" in r.stdout and "[http] zh-en" in r.stdout


def tour() -> list[tuple[str, list[str]]]:
    """The README tour's ``(command, expected output lines)``, comments stripped."""
    block = README.split(TOUR_MARK, 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        line = re.sub(r"\s{2,}# .*$", "", line)
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


VOLATILE = [
    (r"\S*/(demo-out|examples)/", r"/…/\1/"),  # absolute folders, whole or cut to their end
    (r"\b(\d+[smhd] ago|just now)\b", "<when>"),
    (r"[0-9a-f]{12,}…?", "<hash>"),
    (r"\b\d+(\.\d+)? (B|KB|MB|GB)\b", "<size>"),
    (r"\b\d+\.\d+(e-?\d+)?\b", "<number>"),
]


def masked(text: str, root: Path) -> str:
    """Times, hashes, sizes, float figures and the absolute folder replaced; spaces collapsed
    (column widths follow the values)."""
    text = text.replace(str(root), "/…")
    for pattern, repl in VOLATILE:
        text = re.sub(pattern, repl, text)
    return " ".join(text.split())


def fits(want: list[str], got: list[str]) -> bool:
    """Line by line; an expected line ``…`` stands for any number of lines."""
    if not want:
        return not got
    if want[0] == "…":
        return any(fits(want[1:], got[j:]) for j in range(len(got) + 1))
    return bool(got) and got[0] == want[0] and fits(want[1:], got[1:])


def matches(expected: list[str], actual: list[str], root: Path) -> bool:
    def lines(text: list[str]) -> list[str]:
        return [masked(x, root) for x in text if x.strip()]

    return fits(lines(expected), lines(actual))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_tour_prints_what_the_readme_shows(demo):
    out, r = demo
    assert r.returncode == 0, r.stderr[-3000:]
    root = out.parent
    env = {
        **os.environ,
        "ADAPTR_HOME": "demo-out/registry",
        "COLUMNS": "80",
        "PYTHONUNBUFFERED": "1",
    }
    bin_dir = Path(sys.executable).parent  # the venv's `adaptr` script, as a user runs it
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    steps = tour()
    assert len(steps) >= 10
    for command, expected in steps:
        done = subprocess.run(
            ["bash", "-c", command], cwd=root, env=env, text=True, timeout=300,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip  # bash reads the command as written, quoting included; notes in order
        actual = done.stdout.splitlines()
        assert done.returncode == 0, (command, done.stdout)
        assert matches(expected, actual, root), (
            f"README tour: `{command}` printed\n"
            + "\n".join(actual)
            + "\nnot\n"
            + "\n".join(expected)
        )


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quickstart_runs(tmp_path):
    r = run_example("quickstart.py", "--out", str(tmp_path / "qs"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "composed: blend@1 from ['zh-en@1', 'quotes@1'] by cat" in r.stdout
    assert "served zh-en" in r.stdout and "| verify: ok" in r.stdout
