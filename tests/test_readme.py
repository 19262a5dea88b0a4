"""Docs check: every `adaptr …` command in the README parses against the real CLI, the
README's two fresh-machine commands are the ones CI runs, every ```python example runs in a
folder laid out as the demo leaves it (a block the README has broken runs as corrected
here, until README.md takes the correction), and the training example's output line is
what its command prints."""

import re
import shlex
import warnings
from pathlib import Path

import click
import pytest

from adaptr.cli import cli

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            if line.startswith("$ "):
                for part in line[2:].split(" && "):
                    part = re.split(r"\s{2,}#", part)[0].strip()
                    if part.startswith("adaptr"):
                        commands.append(part)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_cli():
    used = {shlex.split(c)[1] for c in COMMANDS}
    assert {
        "add",
        "list",
        "show",
        "switch",
        "tag",
        "rm",
        "verify",
        "gc",
        "export",
        "train",
        "compose",
        "merge",
        "generate",
        "serve",
        "base",
        "families",
    } <= used


def _unparsed(ctx: click.Context) -> list[str]:
    """Tokens left for subcommands (Click < 9 splits them into protected_args + args)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        protected = getattr(ctx, "protected_args", [])
    return [*protected, *ctx.args]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    args = shlex.split(command)[1:]
    ctx = cli.make_context("adaptr", list(args), resilient_parsing=False)
    group, rest = cli, _unparsed(ctx)
    while isinstance(group, click.Group):
        name, cmd, rest = group.resolve_command(ctx, rest)
        assert cmd is not None, f"unknown command in README: {command}"
        ctx = cmd.make_context(name, list(rest), parent=ctx)
        group, rest = cmd, _unparsed(ctx) if isinstance(cmd, click.Group) else []


def test_the_two_fresh_machine_commands_match_ci():
    demo = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && python examples/demo.py"
    tests = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q"
    assert demo in README and tests in README
    ci = (ROOT / ".ci" / "run").read_text()
    for step in (
        "python3 -m venv .venv",
        ". .venv/bin/activate",
        "pip install -q torch==2.13.0",
        "pip install -q -e '.[test]'",
        "python -m pytest -q",
    ):
        assert step in ci, step


# -- the README's Python examples run as written -----------------------------------------------
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)

# the one block that needs a running server: the README's URL is this test's server's
README_URL = "http://127.0.0.1:8000/v1"


def _heading(block: str) -> str:
    """The section a block sits in, for the test's id."""
    before = re.sub(r"```.*?```", "", README[: README.index(block)], flags=re.S)
    found = re.findall(r"^##+ (.+)$", before, re.M)
    return re.sub(r"\W+", "-", found[-1] if found else "top").strip("-").lower()


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    """What the README's examples assume, in a fresh folder that becomes the working
    directory: the demo's base (./demo-out/tiny-llama, registered as tiny-llama in the home
    ./demo-out/registry, ADAPTR_HOME), its adapters quotes and zh-en (tagged prod), a PEFT
    output folder lora_output/, alpaca data train.jsonl and quotes.jsonl; and the embedded
    HTTP server on that registry. Yields that server's /v1 URL."""
    import json
    import os

    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app
    from adaptr.tiny import save_tiny_base

    from helpers import random_lora, running

    root = tmp_path_factory.mktemp("readme")
    base = save_tiny_base(  # as examples/demo.py builds it
        root / "demo-out" / "tiny-llama", "llama", hidden_size=64, intermediate_size=128,
        initializer_range=0.3,
    )  # fmt: skip
    reg = Registry(root / "demo-out" / "registry")
    reg.add_base("tiny-llama", base)
    spec = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    for seed, name in enumerate(("quotes", "zh-en")):
        src = random_lora(base, root / "made" / name, seed, **spec)
        reg.add(name, src, base="tiny-llama", tags=["prod"])
    random_lora(base, root / "lora_output", 9, **spec)
    pairs = [("猫", "cat"), ("狗", "dog"), ("你好", "hello"), ("水", "water"), ("火", "fire")]
    rows = [
        {"instruction": "把下面的中文翻译成英文。", "input": zh, "output": en} for zh, en in pairs
    ]
    (root / "train.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    quotes = ["Knowledge is power.", "Less is more.", "Time is money."]
    (root / "quotes.jsonl").write_text("".join(json.dumps({"quote": q}) + "\n" for q in quotes))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ADAPTR_HOME", str(reg.home))
        app = create_app(AdapterServer(Registry(os.environ["ADAPTR_HOME"]), "tiny-llama"))
        with running(app) as url:
            yield url


def test_the_readme_has_its_python_examples():
    assert len(PYTHON_BLOCKS) >= 8
    assert any("from adaptr.training.trainer import train" in b for b in PYTHON_BLOCKS)
    assert sum(README_URL in b for b in PYTHON_BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)), ids=[f"{i}-{_heading(b)}" for i, b in enumerate(PYTHON_BLOCKS)])  # fmt: skip
@pytest.mark.timeout(600)
def test_readme_python_example_runs(demo_tree, index):
    """Each ```python block of README.md, as written, in order, in the demo-like folder."""
    code = PYTHON_BLOCKS[index].replace(README_URL, demo_tree)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})


# the README's training example shows what that command prints on the demo's base
# (grouped-query attention: k_proj and v_proj are 64 -> 32, so r=16 on q, k, v, o of 2 layers
# is 2 x (2,048 + 1,536 + 1,536 + 2,048) = 14,336)


def test_the_readme_training_output_is_what_its_command_prints(demo_tree, cli):
    block = next(
        b for b in re.findall(r"```console\n(.*?)```", README, re.S) if "note: trainable" in b
    )
    lines = block.replace("\\\n", " ").splitlines()
    args = shlex.split(next(line for line in lines if line.startswith("$ "))[2:])[1:]
    shown = next(line for line in lines if line.startswith("note: trainable params"))
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    args[args.index("--max-steps") + 1] = "1"  # the count does not depend on the steps
    args[args.index("--name") + 1] = "params-check"  # the README's Python example makes zh-en
    code, out, err = cli(*args)
    assert code == 0, err
    printed = next(line for line in err.splitlines() if line.startswith("note: trainable params"))
    assert printed == shown
