"""Bad input: one line `error: …`, a non-zero exit, no traceback, and the registry unchanged."""

import json
import os
import pickle

import pytest

from helpers import refused, run_adaptr, snapshot, write_adapter


@pytest.fixture
def populated(cli, home, tmp_path):
    """A registry holding legal@1 (tagged prod, active) so that damage would show."""
    src = write_adapter(tmp_path / "legal", base="org/llama")
    assert cli("add", "legal", str(src), "--tag", "prod")[0] == 0
    assert cli("switch", "legal")[0] == 0
    return snapshot(home)


@pytest.mark.parametrize(
    "args, match",
    [
        (("show", "nope"), "unknown adapter 'nope'"),
        (("show", "legl"), "did you mean 'legal'"),
        (("show", "legal@7"), "legal has no version 7"),
        (("show", "legal@beta"), "legal has no tag 'beta'"),
        (("export", "nope", "OUT"), "unknown adapter"),
        (("tag", "nope", "prod"), "unknown adapter"),
        (("tag", "legal", "7"), "cannot be all digits"),
        (("switch", "legal@3"), "no version 3"),
        (("rm", "legal@beta"), "no tag 'beta'"),
        (("rm", "legal"), "is tagged prod and active"),
        (("verify", "ghost"), "unknown adapter"),
        (("show", "Legal"), "invalid adapter name"),
        (("add", "a/b", "SRC"), "invalid adapter name 'a/b'"),
        (("add", "..", "SRC"), "invalid adapter name '..'"),
        (("add", "Legal", "SRC"), "invalid adapter name 'Legal'"),
        (("add", "/abs/path", "SRC"), "invalid adapter name '/abs/path'"),
        (("add", "x", "SRC", "--tag", "Prod"), "invalid tag"),
        (("add", "x", "SRC", "--base", "/no/such/base"), "is not a model folder"),
        (("base", "add", "b", "/no/such/model"), "no model folder"),
        (("export", "legal", "OUT", "--format", "onnx"), "Invalid value"),
        (("list", "--frob"), "No such option"),
        (("frobnicate",), "No such command"),
    ],
)
def test_refused_references_and_names(cli, home, tmp_path, populated, args, match):
    src = write_adapter(tmp_path / "src")
    out = tmp_path / "out"
    args = tuple(str(src) if a == "SRC" else str(out) if a == "OUT" else a for a in args)
    refused(cli, home, populated, *args, match=match)


def _source(tmp_path, kind: str):
    d = tmp_path / kind
    if kind == "missing":
        return d
    d.mkdir()
    if kind == "empty":
        return d
    if kind == "no-config":
        write_adapter(d)
        (d / "adapter_config.json").unlink()
    elif kind == "nested":
        write_adapter(d / "task-a")
    elif kind == "bad-json":
        write_adapter(d)
        (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    elif kind == "not-object":
        write_adapter(d)
        (d / "adapter_config.json").write_text("[1, 2]")
    elif kind == "no-peft-type":
        write_adapter(d)
        (d / "adapter_config.json").write_text('{"r": 4}')
    elif kind == "bad-r":
        write_adapter(d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": "eight"}))
    elif kind == "pickle-only":
        write_adapter(d)
        (d / "adapter_model.safetensors").unlink()
        (d / "adapter_model.bin").write_bytes(pickle.dumps(_Boom()))
    elif kind == "no-weights":
        write_adapter(d)
        (d / "adapter_model.safetensors").unlink()
    elif kind == "truncated":
        write_adapter(d)
        p = d / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    elif kind == "garbage":
        write_adapter(d)
        (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    elif kind == "bad-header":
        write_adapter(d)
        p = d / "adapter_model.safetensors"
        data = bytearray(p.read_bytes())
        data[9] = ord("!")  # inside the JSON header
        p.write_bytes(bytes(data))
    elif kind == "rank-mismatch":
        write_adapter(d, r=4)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    elif kind == "untargeted":
        write_adapter(d, modules=("q_proj", "v_proj"))
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    elif kind == "dora-mismatch":
        write_adapter(d, use_dora=True)
    elif kind == "no-lora-tensors":
        import numpy as np
        from safetensors.numpy import save_file

        write_adapter(d)
        save_file(
            {"something.weight": np.zeros((2, 2), np.float32)}, str(d / "adapter_model.safetensors")
        )
    elif kind == "symlink-out":
        outside = write_adapter(tmp_path / "elsewhere")
        write_adapter(d)
        (d / "adapter_model.safetensors").unlink()
        (d / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    elif kind == "symlink-broken":
        write_adapter(d)
        (d / "README.md").symlink_to(d / "nowhere.md")
    return d


class _Boom:
    """Unpickling this would create a file: the test proves adaptr never unpickles."""

    def __reduce__(self):
        return (open, ("/tmp/adaptr-unpickled-marker", "w"))


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("no-config", "has no adapter_config.json"),
        ("nested", "sub-folders task-a"),
        ("bad-json", "is not valid JSON (column 30: Expecting property name"),
        ("not-object", "must hold a JSON object"),
        ("no-peft-type", "has no peft_type"),
        ("bad-r", "r must be a positive integer"),
        ("pickle-only", "holds only adapter_model.bin, a pickle"),
        ("no-weights", "has no adapter_model.safetensors"),
        ("truncated", "not a valid safetensors file"),
        ("garbage", "not a valid safetensors file"),
        ("bad-header", "not a valid safetensors file"),
        ("rank-mismatch", "but the config says r=8"),
        ("untargeted", "is not in target_modules"),
        ("dora-mismatch", "lacks a DoRA magnitude vector"),
        ("no-lora-tensors", "holds no LoRA tensors"),
        ("symlink-out", "outside the adapter folder"),
        ("symlink-broken", "broken symlink"),
    ],
)
def test_refused_source_folders(cli, home, tmp_path, populated, kind, match):
    marker = "/tmp/adaptr-unpickled-marker"
    if os.path.exists(marker):
        os.remove(marker)
    src = _source(tmp_path, kind)
    refused(cli, home, populated, "add", "legal", str(src), match=match)
    assert not os.path.exists(marker)


def test_adapter_that_does_not_fit_its_base(cli, home, tmp_path, populated, tiny_llama):
    wide = write_adapter(tmp_path / "wide", hidden=48)  # the tiny base is 32 wide
    line = refused(
        cli,
        home,
        populated,
        "add",
        "legal",
        str(wide),
        "--base",
        str(tiny_llama),
        match="does not fit base",
    )
    assert "q_proj is [32, 32] in the base" in line
    other = write_adapter(tmp_path / "other", modules=("q_proj", "qkv_proj"))
    refused(
        cli,
        home,
        populated,
        "add",
        "legal",
        str(other),
        "--base",
        str(tiny_llama),
        match="has no module",
    )


def test_export_into_non_empty_dir_needs_force(cli, home, tmp_path, populated):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(cli, home, populated, "export", "legal", str(out), match="not empty; pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    assert cli("export", "legal", str(out), "--force")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()


def test_no_traceback_from_a_real_process(home, tmp_path):
    r = run_adaptr("add", "legal", str(tmp_path / "nowhere"), home=home)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: adapter folder {tmp_path / 'nowhere'} does not exist"
    ]
    r = run_adaptr("--debug", "show", "nope", home=home)
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" in r.stderr and last.startswith(
        f"error: unknown adapter 'nope' in {home.resolve()}: "
    )


LONG = "b" * 1024


@pytest.mark.parametrize(
    "args",
    [
        ("add", "x", "SRC", "--base", LONG),
        ("add", "x", LONG),
        ("add", "x", f"/tmp/{LONG}/adapter"),
        ("base", "add", "b", LONG),
        ("base", "add", LONG, "SRC"),
        ("export", "legal", LONG),
        ("merge", "legal", "--out", LONG),
        ("generate", "legal", "hi", "--base", LONG),
        ("compose", "legal", "--name", "c", "--base", LONG),
        ("eval", "legal", "--data", LONG, "--format", "text"),
    ],
)
def test_a_name_or_path_too_long_for_any_file_system_is_one_line(
    cli, home, tmp_path, populated, args
):
    src = write_adapter(tmp_path / "src")
    args = tuple(str(src) if a == "SRC" else a for a in args)
    line = refused(cli, home, populated, *args, match="", max_len=300)
    assert "File name too long" not in line and ("too long" in line or "at most 64" in line)
