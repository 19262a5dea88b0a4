"""training.recipe: hostile recipes, YAML flags and training numbers are refused in one line."""

from __future__ import annotations

import re

import pytest

from adaptr.errors import InvalidInputError
from adaptr.registry import Registry

from helpers import refused, snapshot


# ------------------------------------------------------------------- recipes
def _laughs(levels: int) -> str:
    """A 'billion laughs' YAML value: each level is nine aliases of the one before."""
    out = ["  dtype:", "    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        out.append(f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(out) + "\n"


def _recipe(tmp_path, text: str, name: str = "recipe.yaml"):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


BASIC = "name: x\ndata: {path: d.jsonl, format: alpaca}\nbase:\n  path: b\n"


@pytest.mark.parametrize(
    "text, match",
    [
        pytest.param(BASIC + _laughs(9), "expands to more than 10,000 values through YAML aliases", id="laughs-9"),
        pytest.param(BASIC + _laughs(4), "base.dtype must be one of auto, float32, bfloat16, float16, got [[", id="laughs-4"),
        pytest.param(BASIC.replace("base:\n  path: b\n", "base: &b {path: *b}\n"), "refers to itself", id="self-mapping"),
        pytest.param("name: &n [*n]\n", "refers to itself", id="self-list"),
        pytest.param("name: " + "[" * 50_000 + "]" * 50_000 + "\n", "recipe.yaml", id="deep"),
        pytest.param(BASIC + "  dtype: 2024-13-45\n", "holds a value YAML cannot read", id="bad-date"),
        pytest.param(BASIC + "  dtype: '" + "x" * 100_000 + "'\n", "got 'xxxx", id="long-dtype"),
        pytest.param("name: x\ntags: {a: 1}\n", "tags in", id="tags-mapping"),
        pytest.param(BASIC.replace("d.jsonl", "[1, 2]"), "data.path must be text", id="path-list"),
        pytest.param(BASIC + "  trust_remote_code: 'yes'\n", "base.trust_remote_code must be true or false", id="trust-string"),
        pytest.param("name: x\ndata: {path: d.jsonl, format: alpaca, limit: many}\nbase: {path: b}\n",
                     "data.limit must be a positive whole number", id="limit-string"),
        pytest.param("name: x\ndata: {path: d.jsonl, format: alpaca, options: [1]}\nbase: {path: b}\n",
                     "data.options must be a mapping", id="options-list"),
        pytest.param(BASIC + "lora: {target_modules: [1, 2]}\n", "lora.target_modules must be", id="targets-numbers"),
        pytest.param("{1: 2}\n", "unknown recipe key 1", id="int-key"),
        pytest.param("x" * 100 + ": 1\n", "unknown recipe key 'xxxx", id="long-key"),
        pytest.param(b"name: x\n# caf\xe9\n", "line 2 (byte 13) is not valid UTF-8: re-encode it as UTF-8", id="latin-1"),
    ],
)  # fmt: skip
def test_hostile_recipes(cli, home, tmp_path, populated, text, match):
    recipe = _recipe(tmp_path, text)
    refused(cli, home, populated, "train", "--recipe", str(recipe), match=match)
    from adaptr.training.trainer import train

    with pytest.raises(InvalidInputError, match=re.escape(match)) as e:
        train(recipe, registry=Registry(home), progress=False)
    assert len(str(e.value)) <= 400
    assert snapshot(home) == populated


def test_oversized_recipe_file(cli, home, tmp_path, populated):
    recipe = _recipe(tmp_path, "# " + "x" * 2 * 1024 * 1024 + "\n")
    refused(cli, home, populated, "train", "--recipe", str(recipe), match="is 2,097,155 bytes")


@pytest.mark.parametrize("option", ["--set", "--format-option"])
def test_hostile_yaml_in_flags(cli, home, tmp_path, populated, option):
    key = "base.dtype" if option == "--set" else "lang"
    value = "[&a [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(["*a"] * 2000) + "]"
    refused(cli, home, populated, "train", option, f"{key}={value}", match="through YAML aliases")
    refused(cli, home, populated, "train", option, f"{key}=&a [*a]", match="refers to itself")
    line = refused(
        cli, home, populated, "train", option, f"{key}=" + "[" * 100_000, match=f"{option} {key}"
    )
    assert "not valid YAML" in line or "nested too deeply" in line


@pytest.mark.parametrize(
    "args, match",
    [
        (("--batch-size", "0"), "0 is not in the range x>=1"),
        (("--grad-accum", "0"), "0 is not in the range x>=1"),
        (("--max-length", "0"), "0 is not in the range x>=1"),
        (("--lr", "-1"), "-1.0 is not in the range x>=0"),
        (("--epochs", "0"), "0.0 is not in the range x>0"),
        (("--max-steps", "-5"), "-5 is not in the range x>=1"),
        (("--set", "sft.per_device_train_batch_size=0"), "sft.per_device_train_batch_size must be a positive whole number, got 0"),
        (("--set", "sft.gradient_accumulation_steps=0"), "sft.gradient_accumulation_steps must be a positive whole number"),
        (("--set", "sft.max_length=0"), "sft.max_length must be a positive whole number (or null)"),
        (("--set", "sft.learning_rate=-1"), "sft.learning_rate must be a number of at least 0"),
        (("--set", "sft.max_steps=-5"), "sft.max_steps must be a positive whole number (or -1)"),
        (("--set", "sft.num_train_epochs=0"), "sft.num_train_epochs must be a number above 0"),
        (("--set", "sft.seed=abc"), "sft.seed must be a whole number"),
        (("--set", "sft.seed=null"), "sft.seed must be a whole number"),
    ],
)  # fmt: skip
def test_training_numbers_that_would_fail_mid_setup(cli, home, populated, args, match):
    base = ("--base", "org/model", "--data", "d.jsonl", "--format", "alpaca", "--name", "x")
    refused(cli, home, populated, "train", *base, *args, match=match)
