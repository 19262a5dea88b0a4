"""`adaptr add` stores what PEFT would load, and refuses what PEFT would silently ignore.

Real adapter folders are written here with PEFT's save_pretrained on tiny models, then
reshaped as people's files are: keys saved from a model's state_dict (with the adapter
name), keys without PEFT's prefix, a resized vocabulary, a Trainer checkpoint folder.
Each case runs through the CLI and the Python API.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from adaptr.errors import IncompatibleBaseError, InvalidAdapterError, InvalidInputError
from adaptr.registry import Registry

from helpers import refused, snapshot

WEIGHTS = "adapter_model.safetensors"
IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])


# ------------------------------------------------------------------------ helpers
def _save_lora(base: Path, out: Path, seed: int = 1, model=None, **spec) -> Path:
    """save_pretrained of a LoRA with random (non-zero) weights; modules_to_save copies are
    changed too, so that every tensor the adapter holds changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **spec))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    peft.save_pretrained(out)
    _reconfig(out, init_lora_weights=True)  # as after training: PEFT makes missing B zero
    return out


def _rekey(src: Path, dest: Path, rename) -> Path:
    """A copy of the adapter folder ``src`` with its tensor keys passed through ``rename``
    (None drops a key; a list of keys writes the tensor under each)."""
    shutil.copytree(src, dest)
    tensors = {}
    for key, value in load_file(src / WEIGHTS).items():
        new = rename(key)
        for k in [new] if isinstance(new, str) else new or []:
            tensors[k] = value
    save_file(tensors, str(dest / WEIGHTS))
    return dest


def _with_name(name: str):
    """Keys as a PeftModel's own state_dict names them (adapter ``name`` inside)."""

    def rename(key: str) -> str:
        key = re.sub(r"\.(lora_A|lora_B)\.(weight|bias)$", rf".\1.{name}.\2", key)
        key = re.sub(r"\.(lora_embedding_[AB])$", rf".\1.{name}", key)
        key = re.sub(r"\.lora_magnitude_vector$", f".lora_magnitude_vector.{name}.weight", key)
        if "lora_" not in key and ".base_layer." not in key:  # a modules_to_save copy
            key = re.sub(r"\.(weight|bias)$", rf".modules_to_save.{name}.\1", key)
        return key

    return rename


def _reconfig(folder: Path, **changes) -> None:
    p = folder / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def _logits(base: Path, adapter: Path | None, adapter_name: str = "default") -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _stored_keys(registry: Registry, ref: str) -> dict[str, np.ndarray]:
    return load_file(registry.path(ref)[WEIGHTS])


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """Adapters as PeftModel.save_pretrained writes them, on the tiny LLaMA."""
    root = tmp_path_factory.mktemp("saved")
    qv = ["q_proj", "v_proj"]
    specs = {
        "plain": {"r": 4, "lora_alpha": 8, "target_modules": qv},
        "embed": {"r": 4, "target_modules": ["embed_tokens", "q_proj"]},
        "dora": {"r": 4, "target_modules": qv, "use_dora": True},
        "bias": {"r": 2, "target_modules": qv, "lora_bias": True},
        "saved-modules": {"r": 4, "target_modules": qv, "modules_to_save": ["lm_head", "embed_tokens"]},
    }  # fmt: skip
    return {k: _save_lora(tiny_llama, root / k, **spec) for k, spec in specs.items()}


@pytest.fixture(scope="module")
def resized(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """chinese-alpaca-2 style: a base whose vocabulary was grown (260 -> 300 tokens) and the
    LoRA trained on it, saving embed_tokens and lm_head whole; and a LoRA on the embedding."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("resized")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.resize_token_embeddings(300)
    model.save_pretrained(root / "base-300")
    shutil.copy(tiny_llama / "tokenizer.json", root / "base-300")
    shutil.copy(tiny_llama / "tokenizer_config.json", root / "base-300")
    out = {"base": root / "base-300"}
    qv = ["q_proj", "v_proj"]
    out["saved"] = _save_lora(
        root / "base-300", root / "saved", target_modules=qv, r=4, modules_to_save=["embed_tokens", "lm_head"]
    )  # fmt: skip
    out["lora"] = _save_lora(root / "base-300", root / "lora", target_modules=["embed_tokens"], r=4)
    return out


@pytest.fixture
def populated(cli, home, saved, tiny_llama):
    """A registry holding p@1 (a real LoRA on the tiny base) so that damage would show."""
    assert cli("add", "p", str(saved["plain"]), "--base", str(tiny_llama))[0] == 0
    return snapshot(home)


# -------------------------------------------------- 1. every spelling PEFT applies
@pytest.mark.parametrize("kind", ["plain", "embed", "dora", "bias", "saved-modules"])
def test_keys_with_the_adapter_name_are_stored_as_save_pretrained_writes_them(
    cli, home, tmp_path, tiny_llama, saved, kind
):
    src = _rekey(saved[kind], tmp_path / "state-dict", _with_name("default"))
    canonical = load_file(saved[kind] / WEIGHTS)
    renamed = set(load_file(src / WEIGHTS)) - set(canonical)
    assert len(renamed) >= len(canonical) - 1  # all but a saved embedding's base_layer.weight

    code, out, err = cli("add", "a", str(src), "--base", str(tiny_llama))
    assert code == 0, err
    assert out.strip() == "a@1"
    assert f"of {len(canonical)} tensor names as save_pretrained writes them" in err
    assert "adapter name 'default'" in err

    registry = Registry(home)
    v = registry.add("b", src, base=str(tiny_llama))
    assert any(f"{len(renamed)} of {len(canonical)} tensor names" in n for n in v.notes)
    for ref in ("a@1", v.ref):
        stored = _stored_keys(registry, ref)
        assert stored.keys() == canonical.keys()
        assert all(np.array_equal(stored[k], canonical[k]) for k in canonical)
    assert cli("verify", "a")[0] == 0
    # PEFT loads the export under any adapter name, exactly as the save_pretrained folder
    exported = registry.export("a", tmp_path / "exported")
    want = _logits(tiny_llama, saved[kind])
    assert torch.equal(_logits(tiny_llama, exported, adapter_name="a@1"), want)
    assert not torch.allclose(_logits(tiny_llama, None), want)


def test_keys_with_another_adapter_name_and_a_mixed_spelling(
    cli, home, tmp_path, tiny_llama, saved
):
    # PEFT applies ".legal." keys only when loaded as adapter "legal"; stored, they load as any
    src = _rekey(saved["dora"], tmp_path / "legal", _with_name("legal"))
    code, _, err = cli("add", "legal", str(src), "--base", str(tiny_llama))
    assert code == 0 and "adapter name 'legal'" in err, err
    # half of the keys renamed, DoRA's magnitude spelled .weight (PEFT loads both)
    mixed = _rekey(
        saved["dora"],
        tmp_path / "mixed",
        lambda k: (
            (k + ".weight" if k.endswith("magnitude_vector") else _with_name("default")(k))
            if ".layers.0." in k
            else k
        ),
    )
    v = Registry(home).add("mixed", mixed, base=str(tiny_llama))
    assert _stored_keys(Registry(home), v.ref).keys() == load_file(saved["dora"] / WEIGHTS).keys()
    want = _logits(tiny_llama, saved["dora"])
    for ref in ("legal", "mixed"):
        out = Registry(home).export(ref, tmp_path / f"out-{ref}")
        assert torch.equal(_logits(tiny_llama, out, adapter_name="other"), want)


def test_canonical_folders_are_stored_byte_for_byte(registry, saved, tiny_llama):
    v = registry.add("plain", saved["plain"], base=str(tiny_llama))
    assert not any("save_pretrained writes" in n for n in v.notes)
    blob = registry.path(v.ref)[WEIGHTS]
    assert blob.read_bytes() == (saved["plain"] / WEIGHTS).read_bytes()


def test_a_renamed_header_keeps_data_and_metadata(tmp_path):
    from safetensors import safe_open

    from adaptr.registry.safetensors_header import read_header, write_renamed

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "bb": np.ones(5, np.int8)}
    save_file(arrays, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    write_renamed(tmp_path / "x.safetensors", tmp_path / "y.safetensors", {"bb": "renamed.b"})
    tensors, metadata = read_header(tmp_path / "y.safetensors")  # checks offsets and size
    assert set(tensors) == {"a", "renamed.b"} and metadata == {"format": "pt"}
    raw = (tmp_path / "y.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    with safe_open(tmp_path / "y.safetensors", "np") as f:
        assert np.array_equal(f.get_tensor("renamed.b"), arrays["bb"])
        assert np.array_equal(f.get_tensor("a"), arrays["a"])


# ------------------------------------------- 2. what PEFT would silently ignore
def _no_prefix(k: str) -> str:
    return k.removeprefix("base_model.model.")


def _layer_9(k: str) -> str:
    return k.replace(".layers.1.", ".layers.9.")


def test_peft_ignores_these_keys_so_merge_would_write_the_unchanged_base(
    tmp_path, tiny_llama, saved
):
    """The ground truth behind the refusals below (PEFT 0.21): PEFT loads such folders
    without a word, leaving out those tensors, and the model is the base unchanged."""
    bare = _logits(tiny_llama, None)
    no_prefix = _rekey(saved["plain"], tmp_path / "no-prefix", _no_prefix)
    assert torch.equal(_logits(tiny_llama, no_prefix), bare)
    half = _rekey(saved["plain"], tmp_path / "half", _layer_9)  # layer 1's LoRA names layer 9
    assert torch.equal(
        _logits(tiny_llama, half), _logits(tiny_llama, _only_layer_0(saved, tmp_path))
    )
    other = _rekey(saved["plain"], tmp_path / "other", _with_name("default"))
    assert torch.equal(_logits(tiny_llama, other, adapter_name="x"), bare)  # stored renamed


def _only_layer_0(saved, tmp_path) -> Path:
    return _rekey(saved["plain"], tmp_path / "layer-0", lambda k: None if ".layers.1." in k else k)


def _ignored(tmp_path: Path, saved: dict, kind: str) -> Path:
    d = tmp_path / kind
    if kind == "no-prefix":
        return _rekey(saved["plain"], d, _no_prefix)
    if kind == "model-prefix-missing":  # base_model.model.layers…: no such module in the base
        return _rekey(saved["plain"], d, lambda k: "base_model." + _no_prefix(k))
    if kind == "two-adapters":
        return _rekey(saved["plain"], d, lambda k: [_with_name("a")(k), _with_name("b")(k)])
    if kind == "two-spellings":
        return _rekey(saved["plain"], d, lambda k: [k, _with_name("default")(k)])
    if kind == "whole-state-dict":
        return _rekey(
            saved["saved-modules"],
            d,
            lambda k: [k, k.replace("lm_head.weight", "lm_head.original_module.weight")],
        )
    if kind == "embedding-with-weight":
        return _rekey(saved["embed"], d, lambda k: k + ".weight" if "lora_embedding" in k else k)
    if kind == "module-not-in-base":
        return _rekey(saved["plain"], d, _layer_9)
    if kind == "layer-not-transformed":
        d = _rekey(saved["plain"], d, lambda k: k)
        _reconfig(d, layers_to_transform=[0])
        return d
    if kind == "excluded-module":
        d = _rekey(saved["plain"], d, lambda k: k)
        _reconfig(d, exclude_modules=["v_proj"])
        return d
    if kind == "whole-tensor-not-in-base":
        return _rekey(saved["saved-modules"], d, lambda k: k.replace("lm_head", "score"))
    if kind == "saved-module-missing":
        return _rekey(saved["saved-modules"], d, lambda k: None if "lm_head" in k else k)
    if kind == "whole-weight-of-a-lora-module":
        q = "base_model.model.model.layers.0.self_attn.q_proj"
        return _rekey(
            saved["plain"], d, lambda k: [k, f"{q}.weight"] if k == f"{q}.lora_A.weight" else k
        )
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, error, match",
    [
        ("no-prefix", InvalidAdapterError, "8 of 8 tensors, such as 'model.layers.0.self_attn.q_proj.lora_A.weight', do not start with 'base_model.model.', so PEFT would ignore them"),
        ("model-prefix-missing", IncompatibleBaseError, "the base has no module layers.0.self_attn.q_proj"),
        ("two-adapters", InvalidAdapterError, "holds the tensors of several adapters ('a', 'b'), PEFT loads one"),
        ("two-spellings", InvalidAdapterError, "two spellings of one tensor: keep one of them"),
        ("whole-state-dict", InvalidAdapterError, "is the base model's own copy of a module in modules_to_save"),
        ("embedding-with-weight", InvalidAdapterError, "is a LoRA tensor in no spelling PEFT loads"),
        ("module-not-in-base", IncompatibleBaseError, "the base has no module model.layers.9.self_attn.q_proj"),
        ("layer-not-transformed", InvalidAdapterError, "'model.layers.1.self_attn.q_proj' has LoRA weights but is left out by the config's exclude_modules, modules_to_save or layers_to_transform: PEFT gives it no LoRA layer"),
        ("excluded-module", InvalidAdapterError, "'model.layers.0.self_attn.v_proj' has LoRA weights but is left out"),
        ("whole-tensor-not-in-base", IncompatibleBaseError, "it saves base_model.model.score.weight whole, and the base has no tensor score.weight"),
        ("saved-module-missing", InvalidAdapterError, "its config's modules_to_save lists 'lm_head', and the weights hold no copy of lm_head.weight: PEFT would fail to load it"),
        ("whole-weight-of-a-lora-module", InvalidAdapterError, "PEFT loads it only as model.layers.0.self_attn.q_proj.base_layer.weight"),
    ],
)  # fmt: skip
def test_keys_peft_would_ignore_are_refused(
    cli, home, tmp_path, tiny_llama, saved, populated, kind, error, match
):
    src = _ignored(tmp_path, saved, kind)
    refused(cli, home, populated, "add", "p", str(src), "--base", str(tiny_llama), match=match)
    with pytest.raises(error, match=re.escape(match)):
        Registry(home).add("p", src, base=str(tiny_llama))
    assert snapshot(home) == populated


def test_without_a_base_the_key_checks_still_hold(cli, home, tmp_path, saved, populated):
    src = _ignored(tmp_path, saved, "no-prefix")
    _reconfig(src, base_model_name_or_path=None)
    refused(
        cli, home, populated, "add", "q", str(src), match="do not start with 'base_model.model.'"
    )


# ------------------------------------------------------ 3. a resized vocabulary
RESIZED = "was trained with a resized vocabulary of 300 tokens"


@pytest.mark.parametrize(
    "kind, tensor", [("saved", "lm_head.weight"), ("lora", "embed_tokens.weight")]
)
def test_a_resized_vocabulary_is_refused_at_add(
    cli, home, tmp_path, tiny_llama, resized, populated, kind, tensor
):
    src = resized[kind]
    line = refused(
        cli, home, populated, "add", "zh", str(src), "--base", str(tiny_llama), match=RESIZED
    )
    assert f"and base {tiny_llama} has 260:" in line and tensor in line
    assert "resize_token_embeddings(300)" in line and "pass --base" in line
    with pytest.raises(IncompatibleBaseError, match=RESIZED):
        Registry(home).add("zh", src, base=str(tiny_llama))
    assert snapshot(home) == populated
    # on the base it was trained on (the adapter config names it), it adds and merges
    code, out, err = cli("add", "zh", str(src))
    assert code == 0 and out.strip() == "zh@1", err
    code, _, err = cli("merge", "zh", "--out", str(tmp_path / "merged"))
    assert code == 0, err
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 300


def test_a_stored_resized_vocabulary_gives_merge_and_generate_a_one_line_error(
    cli, home, tmp_path, tiny_llama, resized
):
    """Stored before its base was known (the config names a model not on this machine),
    then merged or run on a base with the original vocabulary."""
    src = tmp_path / "zh"
    shutil.copytree(resized["saved"], src)
    _reconfig(src, base_model_name_or_path="org/not-downloaded")
    code, _, err = cli("add", "zh", str(src))
    assert code == 0 and "shapes not checked" in err, err
    before = snapshot(home)
    out = tmp_path / "merged"
    for command in (
        ("merge", "zh", "--out", str(out), "--base", str(tiny_llama)),
        ("generate", "zh", "hello", "--base", str(tiny_llama)),
    ):
        line = refused(cli, home, before, *command, match=f"zh@1 {RESIZED}")
        assert f"base {tiny_llama} has 260" in line
    assert not out.exists()

    from adaptr import bases, inference
    from adaptr.merge import merge

    registry = Registry(home)
    with pytest.raises(IncompatibleBaseError, match=RESIZED):
        merge(registry, ["zh"], out, base=str(tiny_llama))
    with pytest.raises(IncompatibleBaseError, match=RESIZED):
        inference.load(registry, ["zh"], base=str(tiny_llama))
    model, _ = bases.load_base_model(str(tiny_llama))  # checked on the loaded model too
    with pytest.raises(IncompatibleBaseError, match=RESIZED):
        inference.attach(model, registry, [registry.get("zh")], tmp_path / "work")
    assert snapshot(home) == before


# ----------------------------------------- 4. a config naming another base model
@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """Another model with the tiny LLaMA's shapes (other weights)."""
    from adaptr.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("twin") / "twin-llama", "llama", seed=7)


def test_a_config_naming_another_model_gets_a_note(cli, home, tmp_path, tiny_llama, twin, saved):
    declared = json.loads((saved["plain"] / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert Path(declared) == tiny_llama
    assert cli("base", "add", "twin", str(twin))[0] == 0
    code, out, err = cli("add", "p", str(saved["plain"]), "--base", "twin")
    assert code == 0 and out.strip() == "p@1", err
    assert f"the adapter config says it was trained on {declared!r}, and it is added to base twin ({twin}), another model with the same shapes" in err  # fmt: skip

    registry = Registry(home)
    v = registry.add("p", saved["plain"], base=str(twin))
    assert any(declared in n and "another model" in n for n in v.notes)
    # a Hub id the base does not match by name or files: noted, shapes not checked
    src = tmp_path / "hub"
    shutil.copytree(saved["plain"], src)
    _reconfig(src, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    v = registry.add("h", src, base="twin")
    assert any("'meta-llama/Llama-2-7b-hf'" in n and "base twin" in n for n in v.notes)


def test_the_same_model_by_another_name_gets_no_note(cli, home, tmp_path, tiny_llama, saved):
    assert cli("base", "add", "tiny", str(tiny_llama))[0] == 0
    registry = Registry(home)
    for base in ("tiny", str(tiny_llama)):  # the registered name, the folder itself
        v = registry.add("p", saved["plain"], base=base)
        assert not any("trained on" in n for n in v.notes), v.notes
    copy = tmp_path / "elsewhere" / tiny_llama.name  # a copy of the declared folder
    shutil.copytree(tiny_llama, copy)
    code, _, err = cli("add", "p", str(saved["plain"]), "--base", str(copy))
    assert code == 0 and "trained on" not in err, err
    src = tmp_path / "hub-name"  # trained on a local copy of the Hub model the base came from
    shutil.copytree(saved["plain"], src)
    _reconfig(src, base_model_name_or_path=f"/models/{tiny_llama.name}")
    v = registry.add("p", src, base="tiny")
    assert not any("trained on" in n for n in v.notes), v.notes


# --------------------------------------------------- 5. re-adding the same content
def test_re_adding_the_same_content_says_so(cli, home, tmp_path, tiny_llama, saved):
    assert cli("add", "legal", str(saved["plain"]))[0] == 0
    code, out, err = cli("add", "legal", str(saved["plain"]))
    assert code == 0 and out.strip() == "legal@2"  # the user's choice to keep it
    assert (
        "note: legal@2 is identical to legal@1; stored anyway: `adaptr rm legal@2` removes it"
        in err
    )

    registry = Registry(home)
    v = registry.add("legal", saved["plain"])
    assert v.ref == "legal@3"
    assert any(n.startswith("legal@3 is identical to legal@2;") for n in v.notes)
    # the same adapter with another model card, under another name
    card = tmp_path / "card"
    shutil.copytree(saved["plain"], card)
    (card / "README.md").write_text("# another card\n")
    v = registry.add("other", card)
    assert any(
        "other@1 is the same weights and config as legal@3 (other files differ)" in n
        for n in v.notes
    ), v.notes
    # keys renamed when stored: renamed the same way each time, so the same files again
    renamed = _rekey(saved["plain"], tmp_path / "renamed", _with_name("default"))
    v = registry.add("legal", renamed)
    assert not any("identical" in n for n in v.notes)
    v = registry.add("legal", renamed)
    assert any(n.startswith("legal@5 is identical to legal@4") for n in v.notes)
    # other content: no such note
    v = registry.add("legal", saved["dora"])
    assert not any("identical" in n or "the same weights" in n for n in v.notes)


# ----------------------------------------------- 6. a Trainer checkpoint folder
def _checkpoint(src: Path, dest: Path, tiny_llama: Path) -> Path:
    """What Trainer.save_checkpoint writes for a PEFT model: the adapter, the tokenizer,
    and its own state (optimizer, scheduler, RNG, arguments, trainer_state.json)."""
    shutil.copytree(src, dest)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(dest)
    torch.save({"state": {}, "param_groups": [{"lr": 2e-4}]}, dest / "optimizer.pt")
    torch.save({"last_epoch": 20}, dest / "scheduler.pt")
    torch.save({"python": 1, "cpu": torch.get_rng_state()}, dest / "rng_state.pth")
    torch.save({"output_dir": "out"}, dest / "training_args.bin")
    (dest / "trainer_state.json").write_text(
        json.dumps({"global_step": 20, "log_history": [{"loss": 1.5, "step": 10}]})
    )
    (dest / "README.md").write_text("---\nlibrary_name: peft\n---\n# model card\n")
    return dest


def test_a_trainer_checkpoint_stores_only_the_adapter(cli, home, tmp_path, tiny_llama, saved):
    ckpt = _checkpoint(saved["plain"], tmp_path / "run" / "checkpoint-20", tiny_llama)
    code, out, err = cli("add", "ck", str(ckpt), "--base", str(tiny_llama))
    assert code == 0 and out.strip() == "ck@1", err
    assert (
        "note: skipped optimizer.pt, rng_state.pth, scheduler.pt, trainer_state.json, "
        "training_args.bin (training state, not part of an adapter)"
    ) in err
    registry = Registry(home)
    v = registry.add("ck", ckpt, base=str(tiny_llama))
    assert any("trainer_state.json" in n and "training state" in n for n in v.notes)
    for version in (registry.get("ck@1"), v):
        stored = {f.path for f in version.files}
        assert {"adapter_config.json", WEIGHTS, "README.md", "tokenizer.json"} <= stored
        assert "tokenizer_config.json" in stored
        assert not stored & {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}  # fmt: skip
    out_dir = registry.export("ck", tmp_path / "exported")
    assert "trainer_state.json" not in {p.name for p in out_dir.iterdir()}
    assert torch.equal(_logits(tiny_llama, out_dir), _logits(tiny_llama, saved["plain"]))


def test_results_and_logs_beside_a_trainer_output_are_not_stored(registry, tmp_path, saved):
    src = tmp_path / "out"
    shutil.copytree(saved["plain"], src)
    for name in ("all_results.json", "train_results.json", "trainer_log.jsonl", "running_log.txt", "training_args.yaml"):  # fmt: skip
        (src / name).write_text("{}\n")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    v = registry.add("lf", src)
    assert {f.path for f in v.files} == {
        "adapter_config.json",
        WEIGHTS,
        "README.md",
        "chat_template.jinja",
    }
    assert any("all_results.json" in n and "training state" in n for n in v.notes)


def test_stored_keys_without_the_prefix_are_refused_by_merge(
    cli, home, tmp_path, tiny_llama, saved, monkeypatch
):
    """A version stored by an adaptr that did not check keys: merging it would write the base."""
    from adaptr.registry import adapter_dir

    src = _rekey(saved["plain"], tmp_path / "old", _no_prefix)
    with monkeypatch.context() as m:
        m.setattr(adapter_dir, "_check_lora", lambda adapter: None)
        Registry(home).add("old", src, base=str(tiny_llama))
    before = snapshot(home)
    match = "old@1 holds 8 tensors, such as 'model.layers.0.self_attn.q_proj.lora_A.weight', without PEFT's 'base_model.model.' prefix"  # fmt: skip
    refused(cli, home, before, "merge", "old", "--out", str(tmp_path / "m"), match=match)
    from adaptr.merge import merge

    with pytest.raises(InvalidInputError, match=re.escape(match)):
        merge(Registry(home), ["old"], tmp_path / "m")
    assert not (tmp_path / "m").exists()
