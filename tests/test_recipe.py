"""training.recipe: files and flags in precedence, validation with suggestions, hostile recipes
refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adaptr.errors import InvalidInputError
from adaptr.registry import Registry
from adaptr.training.recipe import Recipe

from helpers import refused, snapshot

ROOT = Path(__file__).parent.parent
ZH_EN = ROOT / "examples" / "data" / "translate_zh_en.jsonl"


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


def test_recipe_file_and_flag_precedence(cli, registry, tiny_llama, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: from-recipe\ntags: [yaml]\nbase:\n  path: {tiny_llama}\n  dtype: float32\n"
        f"data:\n  path: {ZH_EN}\n  format: alpaca\n  options: {{lang: zh}}\n"
        "lora:\n  r: 8\n  lora_alpha: 4\n  use_rslora: true\n  target_modules: [q_proj, v_proj]\n"
        "sft:\n  max_steps: 3\n  learning_rate: 2e-4\n  per_device_train_batch_size: 4\n  gradient_checkpointing: false\n  warmup_steps: 1\n"
    )
    code, out, err = cli(
        "train", "--recipe", str(recipe), "--r", "2", "--set", "sft.max_steps=2", "--tag", "cli"
    )
    assert code == 0, err
    v = registry.get("from-recipe")
    assert (
        v.r == 2 and v.lora_alpha == 4 and v.summary["use_rslora"] is True
    )  # flag beats file, rest passes through
    assert sorted(v.tags) == ["cli", "yaml"] and v.metrics["steps"] == 2
    rec = v.lineage["recipe"]
    assert (
        rec["sft"]["learning_rate"] == 2e-4
        and rec["sft"]["warmup_steps"] == 1
        and rec["base"]["dtype"] == "float32"
    )


def test_recipe_validation_suggests():
    from adaptr.errors import InvalidInputError

    r = Recipe(
        {
            "name": "x",
            "base": {"path": "b"},
            "data": {"path": "d", "format": "text"},
            "sft": {"learning_rat": 1e-4},
        }
    )
    with pytest.raises(
        InvalidInputError,
        match=r"unknown recipe key sft.learning_rat .*did you mean 'learning_rate'",
    ):
        r.validate()
    with pytest.raises(InvalidInputError, match="unknown recipe key 'lorra'.*did you mean 'lora'"):
        Recipe({"lorra": {}})
    with pytest.raises(
        InvalidInputError, match="unknown recipe key base.quantisation.*did you mean 'quantization'"
    ):
        Recipe({"base": {"quantisation": "4bit"}})
    r = Recipe(
        {
            "name": "x",
            "base": {"path": "b"},
            "data": {"path": "d", "format": "text"},
            "lora": {"rank": 8},
        }
    )
    with pytest.raises(InvalidInputError, match="unknown recipe key lora.rank"):
        r.validate()


def test_the_shipped_7b_recipe_validates():
    """examples/recipes/llama2-7b-qlora.yaml passes validation (it needs a GPU and weights to run)."""
    r = Recipe.from_yaml(ROOT / "examples" / "recipes" / "llama2-7b-qlora.yaml")
    r.validate()
    assert r.base.quantization == "4bit" and r.lora["target_modules"] == "attention"
    assert r.sft["learning_rate"] == 2e-4 and r.sft["gradient_accumulation_steps"] == 8
