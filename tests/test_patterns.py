"""Module-name patterns in adapter configs (registry/patterns.py): regex bombs refused
before PEFT or adaptr matches them; the patterns PEFT users write still accepted.

Each test that meets a bomb runs under a timeout: a regression fails instead of hanging.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptr.errors import InvalidAdapterError
from adaptr.registry import Registry, patterns
from adaptr.registry.adapter_dir import inspect_adapter, pattern_value, targets
from adaptr.registry.patterns import (
    adapter_names,
    check_patterns,
    check_stored_config,
    module_names_of,
    pattern_fields,
)
from adaptr.registry.regex_cost import Unbounded, cost, screen

from helpers import refused, snapshot, write_adapter

BOMB = "([a-z_.0-9]+)+q_proj"  # the issue's: minutes on a module name of 30 characters
NAMES = [
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")
]

# what PEFT users write (PEFT's docs, Unsloth's generated vision patterns, exclusions)
ACCEPTED = [
    r".*\.(q_proj|v_proj)$",
    r".*(q_proj|v_proj)",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"^(?!.*vision).*\.(q_proj|k_proj|v_proj|o_proj)",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|gate_proj|up_proj|down_proj).*?)|"
    r"(?:\bmodel\.layers\.[\d]{1,}\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\."
    r"(?:(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|gate_proj|up_proj|down_proj)))",
    r"(\w+\.)*q_proj",
    r"model\.layers\.(\d|1[0-5])\.mlp\.(gate|up|down)_proj",
    r"(?i).*\.Q_PROJ",
]
BOMBS = [
    BOMB,
    r"(a+)+q_proj",
    r"(x*)*q_proj",
    r"(a|a)*q_proj",
    r"(\w+\.?)*q_proj",
    r"(.*\.)+q_proj",
    r"((ab|a)+)+",
    r"(.*a){12}",  # no nesting under an unbounded repeat, but 12 ways to split, each n long
    r"(q)\1",  # a backreference
]


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_the_patterns_peft_users_write_are_bounded(pattern):
    screen(pattern, "fullmatch")
    check_patterns({"target_modules": pattern}, NAMES, "cfg")


@pytest.mark.parametrize("pattern", BOMBS)
@pytest.mark.timeout(60)
def test_bombs_are_refused_whatever_the_names(pattern):
    with pytest.raises(Unbounded):
        screen(pattern, "fullmatch")
    with pytest.raises(InvalidAdapterError, match="cannot be matched in bounded time"):
        check_patterns({"target_modules": pattern}, [], "cfg")  # no names: still refused


def test_a_linear_pattern_is_accepted_without_measuring(monkeypatch):
    monkeypatch.setattr(patterns, "_measure", lambda *a: pytest.fail("measured"))
    check_patterns({"target_modules": r".*\.(q_proj|v_proj)$"}, NAMES * 1000, "cfg")
    log_c, degree = cost(r".*\.(q_proj|v_proj)$")
    assert degree == 1


@pytest.mark.timeout(120)
def test_a_polynomial_pattern_is_measured_against_the_names_it_will_meet():
    """Seven .* in a row: no nesting, and fast on real module names, but C(n, 7) ways to
    split a name of a's: re.fullmatch, as PEFT calls it, is measured on the names."""
    pattern = r".*a.*a.*a.*a.*a.*a.*b"
    check_patterns({"target_modules": pattern}, NAMES, "cfg")
    with pytest.raises(InvalidAdapterError) as e:
        check_patterns({"target_modules": pattern}, [*NAMES, "a" * 200], "cfg")
    line = str(e.value)
    assert "target_modules" in line and "cannot be matched in bounded time" in line
    assert "CPU" in line and "'aaaa" in line and "\n" not in line


def test_every_field_peft_reads_as_a_pattern():
    config = {
        "peft_type": "LORA",
        "target_modules": "a",
        "exclude_modules": "b",
        "modules_to_save": ["c"],
        "layers_pattern": ["d"],
        "rank_pattern": {"e": 2},
        "alpha_pattern": {"f": 4},
    }
    found = {(p.label, p.regex, p.mode) for p in pattern_fields(config)}
    assert found == {
        ("target_modules", "a", "fullmatch"),  # PEFT's match_target_against_key
        ("exclude_modules", "b", "fullmatch"),  # check_target_module_exists
        ("modules_to_save entry", r"(^|.*\.)c($|\..*)", "match"),
        ("layers_pattern", r"(?:^|.*?\.)d\.(?P<idx>\d+)\.", "match"),
        ("rank_pattern key", r"(.*\.)?(e)$", "match"),  # get_pattern_key
        ("alpha_pattern key", r"(.*\.)?(f)$", "match"),
    }
    osf = pattern_fields({"peft_type": "OSF", "rank_pattern": {"g": 2}})
    assert [(p.regex, p.mode) for p in osf] == [("g", "search")]  # OSF: re.search
    ia3 = pattern_fields({"peft_type": "IA3", "feedforward_modules": "h"})
    assert [(p.label, p.mode) for p in ia3] == [("feedforward_modules", "fullmatch")]
    listed = pattern_fields({"target_modules": ["q_proj", "x("]})
    assert [p.strict for p in listed] == [False, False]  # a list: names, not refused as regexes
    check_patterns({"target_modules": ["q_proj", "x("]}, NAMES, "cfg")


def test_the_names_peft_matches_against():
    keys = [f"base_model.model.{n}.lora_A.weight" for n in NAMES[:1]]
    names = adapter_names(keys)
    module = "model.layers.0.self_attn.q_proj"
    assert {"", "model", "model.layers.0.self_attn", module} <= names
    assert {f"{module}.base_layer", f"{module}.lora_A.default"} <= names  # PEFT's wrappers
    assert f"base_model.model.{module}" in names  # PeftModel's own spelling
    assert module_names_of(["model.norm.weight", "lm_head.weight"]) == {
        "",
        "model",
        "model.norm",
        "lm_head",
    }


# ---------------------------------------------------------------- adaptr add
def _bomb_in(field: str) -> dict:
    return {
        "target_modules": {"target_modules": BOMB},
        "rank_pattern": {"rank_pattern": {BOMB: 2}},
        "alpha_pattern": {"alpha_pattern": {BOMB: 16}},
        "exclude_modules": {"exclude_modules": BOMB},
        "modules_to_save": {"modules_to_save": [BOMB]},
        "layers_pattern": {"layers_pattern": BOMB, "layers_to_transform": [0, 1]},
        "loha": {"peft_type": "LOHA", "target_modules": BOMB},  # not only LoRA
    }[field]


FIELDS = [
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "modules_to_save",
    "layers_pattern",
    "loha",
]
LABELS = {
    "rank_pattern": "rank_pattern key",
    "alpha_pattern": "alpha_pattern key",
    "modules_to_save": "modules_to_save entry",
    "loha": "target_modules",
}


@pytest.fixture
def populated(cli, home, tmp_path) -> dict:
    """A registry holding one adapter, and its snapshot."""
    assert cli("add", "kept", str(write_adapter(tmp_path / "kept")))[0] == 0
    return snapshot(home)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.timeout(60)
def test_add_refuses_a_bomb_in_one_line(cli, home, tmp_path, populated, field):
    src = write_adapter(tmp_path / "bomb", **_bomb_in(field))
    line = refused(
        cli, home, populated, "add", "bomb", str(src), match="cannot be matched in bounded time"
    )
    assert f"{LABELS.get(field, field)} '{BOMB}'" in line
    assert "list the module names" in line or "key it by module names" in line


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
@pytest.mark.timeout(60)
def test_the_python_api_refuses_a_bomb(registry, tmp_path, field):
    src = write_adapter(tmp_path / "bomb", **_bomb_in(field))
    with pytest.raises(InvalidAdapterError, match=r"cannot be matched in bounded time"):
        registry.add("bomb", src)
    with pytest.raises(InvalidAdapterError, match=LABELS.get(field, field)):
        inspect_adapter(src)
    assert registry.list() == []


@pytest.mark.timeout(60)
def test_a_bomb_is_refused_with_a_known_base_too(cli, home, tmp_path, tiny_llama, populated):
    src = write_adapter(tmp_path / "bomb", target_modules=BOMB)
    refused(
        cli, home, populated, "add", "bomb", str(src), "--base", str(tiny_llama), match="bounded"
    )


def test_a_regex_target_modules_is_accepted_and_matches_what_peft_matches(
    registry, tmp_path, tiny_llama
):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from transformers import AutoModelForCausalLM

    regex = r".*\.(q_proj|v_proj)$"
    v = registry.add("rx", write_adapter(tmp_path / "rx", target_modules=regex), base=None)
    assert v.summary["target_modules"] == regex
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    names = [n for n, _ in model.named_modules()]
    check_stored_config(v.config, names, v.ref)  # what serving / generate check first
    for spec in (
        {"target_modules": regex},
        {"target_modules": regex, "exclude_modules": r".*\.1\..*"},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
    ):
        config = LoraConfig(**spec)
        ours = [n for n in names if targets(n, spec["target_modules"], spec)]
        assert ours == [n for n in names if check_target_module_exists(config, n)], spec
    ranks = {r"layers\.0\..*q_proj": 2, "v_proj": 8}
    for n in names:
        key = get_pattern_key(list(ranks), n)
        assert pattern_value(ranks, n, None) == ranks.get(key), n


@pytest.mark.timeout(300)
def test_peft_loads_an_accepted_regex_adapter(registry, tmp_path, tiny_llama):
    from adaptr import inference

    from helpers import random_lora

    src = random_lora(
        tiny_llama, tmp_path / "src", 3, r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)$"
    )
    registry.add_base("tiny", tiny_llama)
    registry.add("rx", src, base="tiny")
    model, _, _ = inference.load(registry, ["rx"])
    wrapped = {n.split(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    layers = model.base_model.model.config.num_hidden_layers
    assert wrapped == {
        f"base_model.model.model.layers.{i}.self_attn.{m}_proj" for i in range(layers) for m in "qv"
    }


# ---------------------------------------------------------------- versions stored before
def _store_unchecked(registry: Registry, monkeypatch, name: str, src: Path):
    """Store ``src`` as adaptr did before it bounded patterns."""
    from adaptr.registry import adapter_dir

    with monkeypatch.context() as m:
        m.setattr(adapter_dir, "check_patterns", lambda *a, **k: None)
        return registry.add(name, src)


@pytest.mark.timeout(60)
def test_a_stored_bomb_is_refused_before_peft_sees_it(registry, tmp_path, monkeypatch):
    src = write_adapter(tmp_path / "old", alpha_pattern={BOMB: 16})
    v = _store_unchecked(registry, monkeypatch, "old", src)
    with pytest.raises(InvalidAdapterError) as e:
        check_stored_config(
            v.config, adapter_names([f"base_model.model.{n}" for n in NAMES]), v.ref
        )
    line = str(e.value)
    assert line.startswith("old@1: alpha_pattern key") and "bounded time" in line
    assert "re-add old@1" in line and "\n" not in line
    with pytest.raises(InvalidAdapterError, match="bounded time"):  # adaptr's own matching
        pattern_value(v.config["alpha_pattern"], NAMES[0], 8)


@pytest.mark.timeout(300)
def test_a_stored_bomb_fails_its_own_requests_and_the_server_goes_on(
    tmp_path, tiny_llama, monkeypatch
):
    """The issue's last case: an alpha_pattern bomb froze the batch worker for every client."""
    from adaptr.serving import AdapterServer

    registry = Registry(tmp_path / "home")
    registry.add_base("tiny", tiny_llama)
    registry.add("good", write_adapter(tmp_path / "good"), base="tiny")
    bomb = write_adapter(tmp_path / "bomb", alpha_pattern={BOMB: 16})
    _store_unchecked(registry, monkeypatch, "bomb", bomb)
    server = AdapterServer(registry, "tiny", max_adapters=2)
    bad = server.submit("hello", "bomb", max_new_tokens=2)
    good = server.submit("hello", "good", max_new_tokens=2)
    with pytest.raises(InvalidAdapterError, match="alpha_pattern key .* bounded time"):
        bad.wait(240)
    assert len(good.wait(240).tokens) == 2
    assert len(server.submit("again", "good", max_new_tokens=2).wait(240).tokens) == 2
