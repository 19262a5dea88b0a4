"""registry.adapter_dir: hostile adapter folders and file sizes are refused in one line."""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from adaptr.errors import InvalidAdapterError
from adaptr.registry import Registry
from adaptr.registry.adapter_dir import inspect_adapter

from helpers import refused, snapshot, write_adapter


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


def test_allow_large_stores_a_file_past_the_limit(cli, home, tmp_path, registry):
    src = write_adapter(tmp_path / "big")
    _sparse(src / "tokenizer.json", 51 * 1024**2)
    code, out, err = cli("add", "p0", str(src), "--allow-large")
    assert code == 0 and out.strip() == "p0@1", err
    sizes = {f.path: f.size for f in registry.get("p0").files}
    assert sizes["tokenizer.json"] == 51 * 1024**2
