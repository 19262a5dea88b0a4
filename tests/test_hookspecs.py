"""Meta-test (as datasette does): every hookspec is documented and exercised by a test."""

import inspect
from pathlib import Path

import pytest

from adaptr.extend import hookspecs

ROOT = Path(__file__).parent.parent
HOOKS = [
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("adaptr_")
]


def test_there_are_hooks():
    assert {"adaptr_register_families", "adaptr_register_formatters"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring_and_readme_section(hook):
    assert (getattr(hookspecs, hook).__doc__ or "").strip(), f"{hook} has no docstring"
    assert f"`{hook}" in (ROOT / "README.md").read_text(), f"{hook} is not documented in README.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    me = Path(__file__).name
    users = [
        p.name
        for p in (ROOT / "tests").glob("test_*.py")
        if p.name != me and f"def {hook}(" in p.read_text()
    ]
    assert users, f"no test implements {hook}"
