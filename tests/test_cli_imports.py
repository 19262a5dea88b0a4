"""Read commands start fast: they never import torch, transformers or peft."""

import json
import subprocess
import sys

import pytest

from helpers import write_adapter

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "numpy")

PROBE = """
import json, sys
from adaptr.cli import main
code = main({args!r})
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    src = write_adapter(tmp_path_factory.mktemp("src") / "a")
    from adaptr.registry import Registry

    Registry(home).add("legal", src, base="org/llama")
    return home


@pytest.mark.parametrize(
    "args",
    [
        ["--help"], ["list"], ["list", "--json"], ["show", "legal"], ["show", "legal", "--json"],
        ["tag", "legal", "prod"], ["switch", "legal"], ["verify"], ["base", "list"], ["show", "--help"],
        ["show", "nope"],
    ],
)  # fmt: skip
def test_no_heavy_imports(populated, args):
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=["--home", str(populated), *args], heavy=HEAVY)],
        capture_output=True, text=True,
    )  # fmt: skip
    probe = json.loads(r.stderr.strip().splitlines()[-1])
    assert probe["heavy"] == [], f"{args} imported {probe['heavy']}"
    assert probe["code"] == (3 if args == ["show", "nope"] else 0)


def test_importing_adaptr_is_light():
    code = f"import sys, adaptr, adaptr.registry; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
