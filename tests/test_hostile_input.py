"""Hostile input: one line `error: …` (never `internal error`), bounded work, nothing stored changed."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adaptr.errors import InvalidAdapterError, InvalidInputError, NotFoundError
from adaptr.registry import Registry
from adaptr.registry.adapter_dir import inspect_adapter

from helpers import refused, snapshot, write_adapter


@pytest.fixture
def populated(cli, home, tmp_path):
    """A registry holding p0@1 so that damage would show."""
    assert cli("add", "p0", str(write_adapter(tmp_path / "p0")))[0] == 0
    return snapshot(home)


# ------------------------------------------------------------------ references
@pytest.mark.parametrize(
    "ref, match",
    [
        ("p0@²", "invalid reference 'p0@²'"),
        ("p0@٣", "invalid reference 'p0@٣'"),  # not version 3: only ASCII digits are versions
        ("p0@99999999999999999999999", "no version is that large"),
        ("p0@" + "9" * 5000, "no version is that large"),
        ("p" * 10_000, "invalid adapter name"),
    ],
)
def test_hostile_references(cli, home, populated, ref, match):
    for command in (("show", ref), ("switch", ref), ("tag", ref, "prod"), ("rm", ref)):
        refused(cli, home, populated, *command, match=match)


# ------------------------------------------------------------- adapter folders
def _header_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _retensor(src, mutate) -> None:
    """Rewrite src's weights header through ``mutate(header)``; data bytes are kept."""
    p = src / "adapter_model.safetensors"
    blob = p.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    mutate(header)
    _header_file(p, header, blob[8 + n :])


def _reconfig(src, **changes) -> None:
    p = src / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _hostile_source(d, kind: str):
    write_adapter(d)
    if kind == "symlink-loop":
        (d / "loop.md").symlink_to(d / "loop.md")
    elif kind == "symlink-loop-pair":
        (d / "a.json").symlink_to(d / "b.json")
        (d / "b.json").symlink_to(d / "a.json")
    elif kind == "string-offsets":
        _retensor(d, lambda h: h[f"{Q0}.lora_A.weight"].update(data_offsets=["0", "512"]))
    elif kind == "list-dtype":
        _retensor(d, lambda h: h[f"{Q0}.lora_A.weight"].update(dtype=["F32"]))
    elif kind == "string-shape":
        _retensor(d, lambda h: h[f"{Q0}.lora_A.weight"].update(shape=["4", "32"]))
    elif kind == "float-shape":
        _retensor(d, lambda h: h[f"{Q0}.lora_A.weight"].update(shape=[4.0, 32]))
    elif kind == "entry-not-object":
        _retensor(d, lambda h: h.update({f"{Q0}.lora_A.weight": [1, 2, 3]}))
    elif kind == "deep-header":
        _header_file(d / "adapter_model.safetensors", {})
        p = d / "adapter_model.safetensors"
        raw = b"[" * 100_000 + b"]" * 100_000
        p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    elif kind in ("empty-shape", "3d-shape"):
        # the same 512 bytes (4*32 F32) described as a scalar-ish or a 3-D tensor
        def mutate(h):
            a = h[f"{Q0}.lora_A.weight"]
            a["shape"] = [] if kind == "empty-shape" else [4, 32, 1]
            if kind == "empty-shape":  # one F32 value: give the rest of A's bytes to a pad tensor
                begin, end = a["data_offsets"]
                a["data_offsets"] = [begin, begin + 4]
                h["pad"] = {
                    "dtype": "U8",
                    "shape": [end - begin - 4],
                    "data_offsets": [begin + 4, end],
                }

        _retensor(d, mutate)
    elif kind == "deep-config":
        (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "deep-config-object":
        (d / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "r": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
        )
    elif kind == "regex-targets":
        _reconfig(d, target_modules="(")
    elif kind == "list-targets-of-numbers":
        _reconfig(d, target_modules=[1, 2])
    elif kind == "rank-pattern-list":
        _reconfig(d, rank_pattern=["q_proj", 4])
    elif kind == "alpha-pattern-string":
        _reconfig(d, alpha_pattern="q_proj")
    elif kind == "rank-pattern-bad-regex":
        _reconfig(d, rank_pattern={"q_proj[": 4})
    elif kind == "alpha-string":
        _reconfig(d, lora_alpha="eight")
    elif kind == "dropout-big":
        _reconfig(d, lora_dropout=5)
    elif kind == "base-name-list":
        _reconfig(d, base_model_name_or_path=["a", "b"])
    elif kind == "huge-r":
        _reconfig(d, r="8" * 100_000)
    elif kind == "loha-huge-r":  # no LoRA checks apply, but r goes into the index
        _reconfig(d, peft_type="LOHA", r=10**30)
    elif kind == "loha-list-r":
        _reconfig(d, peft_type="LOHA", r=[1])
    elif kind == "long-peft-type":
        _reconfig(d, peft_type="X" * 100_000)
    elif kind == "list-task-type":
        _reconfig(d, task_type=[1])
    return d


@pytest.mark.parametrize(
    "kind, match",
    [
        ("symlink-loop", "symlink loop"),
        ("symlink-loop-pair", "symlink loop"),
        ("string-offsets", "data_offsets ['0', '512']: not [begin, end]"),
        ("list-dtype", "unknown dtype ['F32']"),
        ("string-shape", "not a list of sizes"),
        ("float-shape", "not a list of sizes"),
        ("entry-not-object", "malformed entry"),
        ("deep-header", "not a valid safetensors file"),
        ("empty-shape", "LoRA weights are non-empty matrices"),
        ("3d-shape", "LoRA weights are non-empty matrices"),
        ("deep-config", "nested too deeply"),
        ("deep-config-object", "nested too deeply"),
        ("regex-targets", "target_modules '(' is not a valid regular expression"),
        ("list-targets-of-numbers", "target_modules must be a list of module names"),
        ("rank-pattern-list", "rank_pattern must be a mapping"),
        ("alpha-pattern-string", "alpha_pattern must be a mapping"),
        ("rank-pattern-bad-regex", "rank_pattern key 'q_proj[' is not a valid regular expression"),
        ("alpha-string", "lora_alpha must be a number"),
        ("dropout-big", "lora_dropout must be a number between 0 and 1"),
        ("base-name-list", "base_model_name_or_path must be a model id or path"),
        ("huge-r", "r must be a positive integer"),
        (
            "loha-huge-r",
            "r must be a whole number from 0 to 2147483647, got 1000000000000000000000000000000",
        ),
        ("loha-list-r", "r must be a whole number from 0 to 2147483647, got [1]"),
        ("long-peft-type", "is not a PEFT method name"),
        ("list-task-type", "task_type must be a name such as CAUSAL_LM"),
    ],
)
def test_hostile_adapter_folders(cli, home, tmp_path, populated, kind, match):
    src = _hostile_source(tmp_path / kind, kind)
    refused(cli, home, populated, "add", "p0", str(src), match=match)
    with pytest.raises(InvalidAdapterError, match=re.escape(match)):
        Registry(home).add("p0", src)
    assert snapshot(home) == populated


def test_symlink_loop_as_the_folder_itself(cli, home, tmp_path, populated):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    refused(cli, home, populated, "add", "p0", str(loop), match="symlink loop")


def test_regex_target_modules_that_match_are_accepted(registry, tmp_path):
    src = write_adapter(tmp_path / "rx")
    _reconfig(src, target_modules=r".*\.(q_proj|v_proj)")
    assert registry.add("rx", src).version == 1


def test_an_oft_adapter_with_r_zero_is_accepted(registry, tmp_path):
    """PEFT's OFT saves r=0 by default (it sizes its blocks with oft_block_size instead)."""
    src = tmp_path / "oft"
    src.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"
    save_file({key: np.zeros((1, 528), dtype=np.float32)}, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(
        json.dumps({"peft_type": "OFT", "r": 0, "oft_block_size": 32, "target_modules": ["q_proj"]})
    )
    assert registry.add("oft", src).peft_type == "OFT"


def test_a_convolution_lora_is_accepted_and_a_half_3d_pair_is_not(registry, tmp_path):
    """PEFT's Conv2d LoRA: lora_A [r, in, k, k] and a 1x1 lora_B [out, r, 1, 1]."""
    src = tmp_path / "conv"
    src.mkdir()
    key = "base_model.model.vision.conv"
    tensors = {
        f"{key}.lora_A.weight": np.zeros((4, 3, 3, 3), dtype=np.float32),
        f"{key}.lora_B.weight": np.zeros((8, 4, 1, 1), dtype=np.float32),
    }
    save_file(tensors, str(src / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["conv"]}
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    assert registry.add("conv", src).r == 4
    tensors[f"{key}.lora_B.weight"] = np.zeros((8, 4, 3, 3), dtype=np.float32)  # not 1x1
    save_file(tensors, str(src / "adapter_model.safetensors"))
    with pytest.raises(InvalidAdapterError, match="a convolution's kernels with a 1x1 lora_B"):
        registry.add("conv", src)


# --------------------------------------------------------------- file sizes
def _sparse(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)  # no blocks written: a 21 GB file costs nothing
    return path


@pytest.mark.parametrize(
    "name, size, match",
    [
        ("README.md", 10 * 1024**3, "README.md is 10.0 GB, more than an adapter holds"),
        ("tokenizer.json", 60 * 1024**2, "a file beside the weights: at most 50.0 MB"),
        ("extra.safetensors", 21 * 1024**3, "safetensors weights: at most 20.0 GB"),
    ],
)
def test_oversized_files_are_refused(cli, home, tmp_path, populated, name, size, match):
    src = write_adapter(tmp_path / "big")
    _sparse(src / name, size)
    line = refused(cli, home, populated, "add", "p0", str(src), match=match)
    assert "--allow-large" in line
    with pytest.raises(InvalidAdapterError, match="more than an adapter holds"):
        Registry(home).add("p0", src)
    assert snapshot(home) == populated
    if not name.endswith(".safetensors"):  # the override lifts the limit (inspection only)
        assert name in {f.name for f in inspect_adapter(src, allow_large=True).files}


def test_allow_large_still_checks_safetensors_headers(tmp_path):
    src = write_adapter(tmp_path / "big")
    _sparse(src / "extra.safetensors", 21 * 1024**3)
    with pytest.raises(InvalidAdapterError, match="not a valid safetensors file"):
        inspect_adapter(src, allow_large=True)


def test_files_no_adapter_has_are_skipped_not_stored(cli, home, tmp_path, registry):
    src = write_adapter(tmp_path / "odd", extra_files={"README.md": "# card", "LICENSE": "MIT"})
    _sparse(src / "model.gguf", 10 * 1024**3)
    os.mkfifo(src / "pipe.json")
    code, out, err = cli("add", "p0", str(src))
    assert code == 0, err
    assert "skipped model.gguf (not an adapter file: not stored)" in err
    assert "skipped LICENSE (not an adapter file: not stored)" in err
    assert "skipped pipe.json (not a regular file)" in err
    stored = {f.path for f in registry.get("p0").files}
    assert stored == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert sum(f.size for f in registry.get("p0").files) < 10_000


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


# ------------------------------------------------------------------ datasets
@pytest.mark.parametrize(
    "name, content, match",
    [
        pytest.param("d.jsonl", b'{"instruction": "a", "output": "b"}\n' * 2 + b'{"instruction": "caf\xe9", "output": "b"}\n',
                     "d.jsonl line 3 (byte 92) is not valid UTF-8: re-encode it as UTF-8", id="jsonl"),
        pytest.param("d.json", b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}]\n',
                     "d.json line 3 (byte 56) is not valid UTF-8", id="json"),
        pytest.param("d.csv", b"instruction,output\na,b\n\xe9t\xe9,b\n", "d.csv line 3 (byte 23) is not valid UTF-8", id="csv"),
        pytest.param("d.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "d.jsonl line 1 is nested too deeply to be a record", id="deep-jsonl"),
        pytest.param("d.json", b"[" * 100_000 + b"]" * 100_000, "d.json is nested too deeply to be a list of records", id="deep-json"),
    ],
)  # fmt: skip
def test_hostile_datasets(cli, home, tmp_path, populated, name, content, match):
    data = tmp_path / name
    data.write_bytes(content)
    args = ("--base", "org/model", "--data", str(data), "--format", "alpaca", "--name", "x")
    refused(cli, home, populated, "train", *args, match=match)
    from adaptr.data.files import load_records

    with pytest.raises(InvalidInputError, match=re.escape(match)):
        load_records(data, "alpaca")


def test_a_utf8_bom_is_not_an_error(tmp_path):
    from adaptr.data.files import load_records

    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n')
    assert len(load_records(data, "alpaca")) == 1


def test_a_formatter_that_trips_over_a_record_names_it(tmp_path, register_plugin):
    from adaptr import Formatter, hookimpl
    from adaptr.data.files import load_records

    class Plugin:
        @hookimpl
        def adaptr_register_formatters(self, register):
            register(Formatter(name="strict", format=lambda r: {"text": r["a"] + 1}, kind="text"))

    register_plugin(Plugin(), "strict-formatter")
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n{"a": "x"}\n')
    with pytest.raises(
        InvalidInputError, match="d.jsonl line 2: the strict format cannot use this"
    ):
        load_records(data, "strict")


# ---------------------------------------------------------- damaged checkpoints
class _Boom:
    """Unpickling this would create a file: proves a checkpoint is never unpickled freely."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


MARKER = Path("/tmp/adaptr-checkpoint-unpickled-marker")


def _damage(checkpoint: Path, kind: str) -> None:
    if kind == "optimizer-pickle":
        (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(_Boom()))
    elif kind == "rng-garbage":
        (checkpoint / "rng_state.pth").write_bytes(os.urandom(100))
    elif kind == "weights-truncated":
        p = checkpoint / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[:-64])
    elif kind == "state-not-object":
        (checkpoint / "trainer_state.json").write_text("[]")


def test_resume_from_a_damaged_checkpoint(cli, home, tmp_path, tiny_llama):
    data = Path(__file__).parent.parent / "examples" / "data" / "translate_zh_en.jsonl"
    args = ["train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
            "--name", "r", "--batch-size", "2", "--no-gradient-checkpointing",
            "--set", "sft.save_steps=1"]  # fmt: skip
    code, _, err = cli(*args, "--max-steps", "2", "--keep-run")
    assert code == 0, err[-2000:]
    run = home / "runs" / "r"
    shutil.copytree(run, tmp_path / "run-backup")
    before = snapshot(home)
    for kind in ("optimizer-pickle", "rng-garbage", "weights-truncated", "state-not-object"):
        shutil.rmtree(run)
        shutil.copytree(tmp_path / "run-backup", run)
        _damage(run / "checkpoint-2", kind)
        MARKER.unlink(missing_ok=True)
        code, out, err = cli(*args, "--max-steps", "4", "--resume")
        last = err.strip().splitlines()[-1]
        assert code != 0 and "internal error" not in last and "Traceback" not in err, (kind, err)
        assert last.startswith(f"error: checkpoint {run / 'checkpoint-2'} cannot be read ("), last
        assert last.endswith(
            "start over with --restart, or delete that folder to resume from an earlier checkpoint"
        )
        assert len(last) < 400 and not MARKER.exists()
        assert snapshot(home) == before
    # deleting the damaged checkpoint resumes from the one before it
    shutil.rmtree(run / "checkpoint-2")
    code, out, err = cli(*args, "--max-steps", "3", "--resume")
    assert code == 0 and out.startswith("r@2"), err[-2000:]


def test_folders_that_only_look_like_checkpoints_are_not_a_crash(tmp_path):
    from adaptr.training.trainer import _prepare_run_dir

    run = tmp_path / "run"
    (run / "checkpoint-final").mkdir(parents=True)
    (run / "checkpoint-²").mkdir()
    (run / "checkpoint-3").write_text("a file")
    with pytest.raises(NotFoundError, match="nothing to resume"):
        _prepare_run_dir(run, resume=True, restart=False, name="x")


# ------------------------------------------------------- bases that do not fit
@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    from adaptr.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("wide") / "wide-llama", "llama", hidden_size=48)


def test_generate_and_merge_with_a_base_that_does_not_fit(
    cli, home, tmp_path, tiny_llama, wide_llama
):
    assert cli("add", "p0", str(write_adapter(tmp_path / "p0")), "--base", str(tiny_llama))[0] == 0
    before = snapshot(home)
    want = f"p0@1 does not fit base {wide_llama}: model.layers.0.self_attn.q_proj is [48, 48] in the base"
    out = tmp_path / "merged"
    for command in (
        ("generate", "p0", "hello", "--base", str(wide_llama)),
        ("merge", "p0", "--out", str(out), "--base", str(wide_llama)),
        ("compose", "p0", "--name", "c", "--base", str(wide_llama)),  # checked on the loaded model
    ):
        refused(cli, home, before, *command, match=want)
    assert not out.exists()

    from adaptr import bases, inference
    from adaptr.errors import IncompatibleBaseError
    from adaptr.merge import merge

    registry = Registry(home)
    with pytest.raises(IncompatibleBaseError, match=re.escape(want)):
        inference.load(registry, ["p0"], base=str(wide_llama))
    with pytest.raises(IncompatibleBaseError, match=re.escape(want)):
        merge(registry, ["p0"], out, base=str(wide_llama))
    model, _ = bases.load_base_model(str(wide_llama))
    with pytest.raises(IncompatibleBaseError, match="p0@1 does not fit base"):
        inference.attach(model, registry, [registry.get("p0")], tmp_path / "work")
    assert snapshot(home) == before


def test_a_typo_of_a_registered_base_is_refused(cli, home, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert cli("base", "add", "tiny-llama", str(tiny_llama))[0] == 0
    before = snapshot(home)
    src = write_adapter(tmp_path / "src")
    refused(cli, home, before, "add", "p0", str(src), "--base", "tiny-lama",
            match="unknown base 'tiny-lama': did you mean 'tiny-llama'?")  # fmt: skip
    refused(cli, home, before, "add", "p0", str(src), "--base", "Tiny-Llama",
            match="did you mean 'tiny-llama'?")  # fmt: skip
    with pytest.raises(NotFoundError, match="did you mean 'tiny-llama'"):
        Registry(home).add("p0", src, base="tiny-lama")
    assert snapshot(home) == before
    # nothing close: still a Hub id recorded by name, and the note says so
    code, out, err = cli("add", "p0", str(src), "--base", "org/other-model")
    assert code == 0 and out.strip() == "p0@1", err
    assert (
        "base 'org/other-model' is not registered, not a local folder and not in the Hugging Face cache"
        in err
    )
    assert "recorded as a Hub id by name" in err
    assert Registry(home).get("p0").base == "org/other-model"


@pytest.mark.parametrize(
    "kind, match",
    [
        ("deep-config", "config.json is nested too deeply to be a model config"),
        ("deep-index", "model.safetensors.index.json is nested too deeply to be a weights index"),
        ("number-shard", "names shard 5, which is not a file in"),
        ("escaping-shard", "names shard '/etc/passwd', which is not a file in"),
        ("folder-shard", "names shard '.', which is not a file in"),
    ],
)
def test_hostile_base_folders(cli, home, tmp_path, populated, tiny_llama, kind, match):
    base = tmp_path / kind
    shutil.copytree(tiny_llama, base)
    deep = "[" * 100_000 + "]" * 100_000
    index = base / "model.safetensors.index.json"
    if kind == "deep-config":
        (base / "config.json").write_text(deep)
    elif kind == "deep-index":
        index.write_text(deep)
    else:
        shard = {"number-shard": 5, "escaping-shard": "/etc/passwd", "folder-shard": "."}[kind]
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    refused(cli, home, populated, "base", "add", "b", str(base), match=match)
    src = write_adapter(tmp_path / "src")
    refused(cli, home, populated, "add", "p0", str(src), "--base", str(base), match=match)
    with pytest.raises(InvalidInputError, match=re.escape(match)):
        Registry(home).add_base("b", base)


def test_generate_and_compose_options(cli, home, tmp_path, tiny_llama):
    for name, seed in (("p0", 0), ("p1", 1)):
        src = write_adapter(tmp_path / name, seed=seed)
        assert cli("add", name, str(src), "--base", str(tiny_llama))[0] == 0
    before = snapshot(home)
    for args, match in (
        (("generate", "p0", ""), "the prompt is empty"),
        (("generate", "p0", "hi", "--max-new-tokens", "0"), "0 is not in the range x>=1"),
        (("generate", "p0", "hi", "--max-new-tokens", "9" * 30), "the model reads at most 512 tokens"),
        (("compose", "p0", "--name", "c", "--weights", "nan"), "weights must be finite numbers (--weights), got [nan]"),
        (("compose", "p0", "p1", "--name", "c", "--weights", "1,inf"), "weights must be finite numbers (--weights), got [1.0, inf]"),
        (("compose", "p0", "p1", "--name", "c", "--method", "svd", "--svd-rank", "-1"), "-1 is not in the range x>=1"),
    ):  # fmt: skip
        refused(cli, home, before, *args, match=match)


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


def test_allow_large_stores_a_file_past_the_limit(cli, home, tmp_path, registry):
    src = write_adapter(tmp_path / "big")
    _sparse(src / "tokenizer.json", 51 * 1024**2)
    code, out, err = cli("add", "p0", str(src), "--allow-large")
    assert code == 0 and out.strip() == "p0@1", err
    sizes = {f.path: f.size for f in registry.get("p0").files}
    assert sizes["tokenizer.json"] == 51 * 1024**2


def test_an_internal_error_is_still_one_short_line(cli, home, populated, monkeypatch):
    def boom(self, name=None):
        raise RuntimeError("size mismatch " * 1000)

    monkeypatch.setattr(Registry, "list", boom)
    code, out, err = cli("list")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err[:500]
    assert lines[0].startswith("error: internal error (RuntimeError: size mismatch size mismatch")
    assert lines[0].endswith("rerun with --debug for the traceback") and len(lines[0]) < 400


def test_the_context_window_is_not_enforced_past_what_rope_scaling_allows():
    from transformers import LlamaConfig

    from adaptr.bases import context_window

    assert context_window(LlamaConfig(max_position_embeddings=512)) == 512
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    assert context_window(LlamaConfig(max_position_embeddings=512, rope_scaling=yarn)) is None
