"""Newer PEFT adapters (adaptr.registry.peft_methods, adapter_dir, inference, the server).

The installed PEFT is the ground truth: ``add`` takes what it can load and refuses, in one
line naming the PEFT needed, a method or a switched-on field it does not know; ``generate``
runs what ``add`` takes (prompt tuning, KaSA, VeLoRA, layer replication, LoRA on
parameters), token for token as PEFT itself; the server serves them through PEFT's path or
refuses them with a reason that does not depend on what else it holds. Every adapter here is
written by PEFT's own get_peft_model + save_pretrained on the tiny LLaMA.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adaptr.errors import InvalidInputError

from helpers import refused, snapshot

PROMPT = "Hello there"
NEW = 5


def _save(base: Path, path: Path, config, seed: int = 3) -> Path:
    """``config`` put on ``base`` by PEFT, every trainable tensor random, saved by PEFT."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (0.5 if "lora_A" in name else 1.0))
    model.save_pretrained(path)
    return path


def _peft_text(base: Path, folder: Path, **kwargs) -> str:
    """What PEFT itself generates with ``folder`` on a fresh ``base`` (greedy, NEW tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
            do_sample=False, pad_token_id=tok.eos_token_id, **kwargs,
        )  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _base_text(base: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptr import inference

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    return inference.generate(
        model, AutoTokenizer.from_pretrained(base), PROMPT, max_new_tokens=NEW
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from adaptr.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("b") / "tiny", "llama", initializer_range=0.2)


@pytest.fixture(scope="module")
def made(tmp_path_factory, base) -> dict[str, Path]:
    from peft import LoraConfig, MultitaskPromptTuningConfig, PromptTuningConfig
    from peft.tuners.lora.config import KasaConfig, VeloraConfig

    root = tmp_path_factory.mktemp("peft")
    lin = ["q_proj", "v_proj"]
    configs = {
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "mtpt": MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "mtpt2": MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2
        ),
        "kasa": LoraConfig(r=4, target_modules=lin, kasa_config=KasaConfig()),
        "velora": LoraConfig(r=4, target_modules=lin, velora_config=VeloraConfig()),
        "repl": LoraConfig(r=4, target_modules=lin, layer_replication=[[0, 2], [1, 2]]),
        "gate": LoraConfig(r=4, target_modules=["gate_proj"]),  # stacked by the server
        "gdora": LoraConfig(r=4, target_modules=["gate_proj"], use_dora=True),  # PEFT's path
        "tparam": LoraConfig(r=4, target_modules=[], target_parameters=["mlp.gate_proj.weight"]),
        "tparam2": LoraConfig(r=4, target_modules=[], target_parameters=["mlp.up_proj.weight"]),
    }
    return {
        name: _save(base, root / name, cfg, seed=i) for i, (name, cfg) in enumerate(configs.items())
    }


@pytest.fixture
def stored(cli, home, base, made):
    code, _, err = cli("base", "add", "tiny", str(base))
    assert code == 0, err
    for name, folder in made.items():
        code, out, err = cli("add", name, str(folder), "--base", "tiny")
        assert code == 0, (name, err)
    return home


def test_what_add_reads_of_peft_is_what_peft_itself_has():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import TaskType

    from adaptr.registry.peft_methods import installed

    found = installed()
    assert found.version == __import__("peft").__version__
    assert found.methods == {
        str(t.value): frozenset(f.name for f in dataclasses.fields(cls))
        for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
    }
    assert found.tasks == {t.value for t in TaskType}


def test_the_variant_tensors_adaptr_knows_are_the_ones_peft_makes(made):
    """Every tensor KaSA and VeLoRA save beside lora_A/lora_B is one adaptr reads as theirs."""
    from safetensors import safe_open

    from adaptr.registry.adapter_dir import VARIANT_TENSORS

    for name, flag in (("kasa", "kasa_config"), ("velora", "velora_config")):
        with safe_open(made[name] / "adapter_model.safetensors", "pt") as f:
            keys = f.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
            extra = {
                k.rsplit(".", 1)[-1] for k in keys if ".lora_A." not in k and ".lora_B." not in k
            }
        assert extra and all(VARIANT_TENSORS.get(t) == flag for t in extra), extra


def _future(src: Path, dest: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def test_a_method_this_peft_lacks_is_refused_naming_the_peft_it_needs(cli, home, tmp_path, made):
    import peft

    src = _future(made["gate"], tmp_path / "f", peft_type="FUTURE_LORA", peft_version="0.99.1")
    line = refused(cli, home, snapshot(home), "add", "f", str(src), match="FUTURE_LORA")
    assert f"installed PEFT {peft.__version__}" in line and "peft>=0.99.1" in line
    src = _future(made["gate"], tmp_path / "g", peft_type="FUTURE_LORA", peft_version=None)
    line = refused(cli, home, snapshot(home), "add", "f", str(src), match="FUTURE_LORA")
    assert "pip install -U peft" in line


def test_a_field_this_peft_would_drop_is_refused_and_one_left_off_is_not(cli, home, tmp_path, made):
    on = _future(made["gate"], tmp_path / "on", use_future_trick=True, peft_version="0.30.0")
    line = refused(cli, home, snapshot(home), "add", "f", str(on), match="'use_future_trick'")
    assert "would ignore" in line and "peft>=0.30.0" in line
    off = _future(made["gate"], tmp_path / "off", use_future_trick=False, future_config=None)
    code, out, err = cli("add", "f", str(off))
    assert code == 0 and out.strip() == "f@1", err
    odd = _future(made["gate"], tmp_path / "task", task_type="CAUSAL_DREAMS")
    refused(cli, home, snapshot(home), "add", "g", str(odd), match="task_type 'CAUSAL_DREAMS'")


@pytest.mark.parametrize("name", ["prompt", "mtpt", "kasa", "velora", "repl", "tparam"])
def test_generate_runs_what_add_took_as_peft_runs_it(cli, stored, base, made, name):
    code, out, err = cli("generate", name, PROMPT, "--max-new-tokens", str(NEW), "--json")
    assert code == 0, err
    kwargs = {"task_ids": torch.zeros(1, dtype=torch.long)} if name == "mtpt" else {}
    want = _peft_text(base, made[name], **kwargs)
    assert json.loads(out)["completion"] == want
    assert want != _base_text(base), "the adapter changes nothing: the test would prove nothing"


def test_what_peft_cannot_stack_or_run_is_one_line(cli, stored):
    before = snapshot(stored)
    refused(cli, stored, before, "generate", "prompt", "--stack", "kasa", "hi",
            match="PEFT stacks adapters of one method only (prompt@1 is PROMPT_TUNING, kasa@1 is LORA)")  # fmt: skip
    refused(cli, stored, before, "generate", "prompt", "--stack", "mtpt", "hi",
            match="PEFT stacks adapters of one method only")  # fmt: skip
    refused(cli, stored, before, "generate", "velora", "--stack", "kasa", "hi",
            match="PEFT cannot stack kasa@1 on velora@1 (KaSA cannot be combined")  # fmt: skip
    refused(cli, stored, before, "generate", "mtpt2", "hi",
            match="mtpt2@1 is a MULTITASK_PROMPT_TUNING adapter of 2 tasks (num_tasks)")  # fmt: skip


def test_replicated_layers_fit_their_base_layers_and_only_those(cli, home, tmp_path, base, made):
    code, _, err = cli("base", "add", "tiny", str(base))
    assert code == 0, err
    code, out, err = cli("add", "repl", str(made["repl"]), "--base", "tiny")
    assert code == 0 and out.strip() == "repl@1", err
    # a replication of a layer the base does not have: the wrong base, said as before
    wrong = _future(made["repl"], tmp_path / "w", layer_replication=[[0, 2], [2, 3]])
    refused(cli, home, snapshot(home), "add", "w", str(wrong), "--base", "tiny",
            match="the base has no module model.layers.2.self_attn.q_proj")  # fmt: skip
    bad = _future(made["repl"], tmp_path / "b", layer_replication=[[1, 0]])
    refused(cli, home, snapshot(home), "add", "b", str(bad), match="layer_replication must be")


def test_variant_tensors_without_their_variant_are_refused(cli, home, tmp_path, made):
    src = _future(made["kasa"], tmp_path / "k", kasa_config=None)
    refused(cli, home, snapshot(home), "add", "k", str(src),
            match="has a lora_diag tensor but kasa_config is not set: PEFT would ignore it")  # fmt: skip


# -- the server -----------------------------------------------------------------------------


def _server(stored):
    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer

    return AdapterServer(Registry(stored), "tiny", max_adapters=4)


@pytest.mark.parametrize("resident", [(), ("gate",), ("gdora",), ("tparam2",), ("gdora", "gate")])
def test_a_target_parameters_adapter_answers_alike_whatever_the_server_holds(
    stored, base, made, resident
):
    server = _server(stored)
    for ref in resident:
        assert server.generate([PROMPT], [ref], max_new_tokens=NEW) == [_peft_text(base, made[ref])]
    assert server.generate([PROMPT], ["tparam"], max_new_tokens=NEW) == [
        _peft_text(base, made["tparam"])
    ]
    for ref in resident:  # and what it made room for comes back right
        assert server.generate([PROMPT], [ref], max_new_tokens=NEW) == [_peft_text(base, made[ref])]


def test_velora_is_served_through_peft(stored, base, made):
    server = _server(stored)
    server.load("gate")
    assert server.generate([PROMPT, PROMPT], ["velora", "gate"], max_new_tokens=NEW) == [
        _peft_text(base, made["velora"]), _peft_text(base, made["gate"])
    ]  # fmt: skip
    assert "velora@1" in server.served_by_peft()


@pytest.mark.parametrize("name,why", [("kasa", "KaSA adapter (kasa_config)"),
                                      ("repl", "replicates the base's layers (layer_replication)")])  # fmt: skip
def test_what_rewrites_the_shared_base_is_refused_whatever_is_resident(stored, name, why):
    messages = set()
    for resident in ((), ("gate",), ("gdora", "tparam")):
        server = _server(stored)
        for ref in resident:
            server.load(ref)
        with pytest.raises(InvalidInputError) as e:
            server.generate([PROMPT], [name], max_new_tokens=2)
        messages.add(str(e.value))
    assert len(messages) == 1 and why in messages.pop()


def test_the_http_server_answers_a_target_parameters_adapter_after_any_other(stored, base, made):
    from adaptr.serving.openai.app import create_app

    from helpers import client, running

    app = create_app(_server(stored))
    with running(app) as url:
        api = client(url)
        for model in ("gdora", "tparam", "tparam2", "tparam"):
            text = (
                api.completions.create(model=model, prompt=PROMPT, max_tokens=NEW).choices[0].text
            )
            assert text == _peft_text(base, made[model]), model
        for model in ("kasa", "repl"):
            import openai

            with pytest.raises(openai.BadRequestError) as e:
                api.completions.create(model=model, prompt=PROMPT, max_tokens=2)
            assert "AdapterServer cannot serve" in e.value.body["message"]


def test_vllm_check_names_the_variants_it_cannot_serve(stored):
    from adaptr.registry import Registry
    from adaptr.serving.vllm.compat import version_problems

    reg = Registry(stored)
    for ref, said in (("kasa", "KaSA"), ("velora", "VeLoRA"), ("repl", "layer_replication")):
        found = "; ".join(version_problems(reg, reg.get(ref)))
        assert said in found, (ref, found)


@pytest.mark.parametrize(
    "name, said",
    [("prompt", "PROMPT_TUNING adapter (virtual tokens"), ("repl", "replicates layers")],
)
def test_what_merge_cannot_fold_into_the_weights_is_one_line(cli, stored, tmp_path, name, said):
    before = snapshot(stored)
    line = refused(cli, stored, before, "merge", name, "--out", str(tmp_path / "m"), match=said)
    assert "adaptr generate" in line and not (tmp_path / "m").exists()
