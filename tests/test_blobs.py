"""registry/blobs.py: a blob whose bytes are not its name is never served, scored, linked
or deduplicated onto; a source rewritten in place during add is refused; gc never leaves
the store through a link."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adaptr.errors import IntegrityError, InvalidAdapterError
from adaptr.registry import Registry

from helpers import random_lora, write_adapter


def flip_byte(path: Path, offset: int = -5) -> None:
    """Flip one byte in place, as a bad disk or a stray writer would."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    os.chmod(path, 0o444)


def weights_blob(reg: Registry, ref: str) -> Path:
    return reg.path(ref)["adapter_model.safetensors"]


@pytest.fixture
def tiny_served(tmp_path, tiny_llama):
    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    reg.add("good", random_lora(tiny_llama, tmp_path / "g", 1), base="tiny")
    reg.add("bad", random_lora(tiny_llama, tmp_path / "b", 2), base="tiny")
    flip_byte(weights_blob(reg, "bad"))
    return reg


def test_a_corrupt_blob_is_not_served_by_the_adapter_server(tiny_served):
    from adaptr.serving import AdapterServer

    server = AdapterServer(tiny_served, "tiny")
    assert server.generate(["hello"], adapters=["good"], max_new_tokens=2)
    with pytest.raises(IntegrityError, match="bad@1/adapter_model.safetensors is corrupt"):
        server.generate(["hello"], adapters=["bad"], max_new_tokens=2)


def test_a_corrupt_blob_is_not_served_over_http(tmp_path):
    from helpers import client, serve_tiny

    with serve_tiny(tmp_path, [("good", 1), ("bad", 2)]) as (reg, url, _):
        flip_byte(weights_blob(reg, "bad"))
        c = client(url)
        assert c.completions.create(model="good", prompt="hi", max_tokens=2).choices
        import openai

        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="bad", prompt="hi", max_tokens=2)
        assert e.value.status_code != 200 and "corrupt" in str(e.value)


def test_a_corrupt_blob_is_not_scored(tiny_served, tmp_path):
    from adaptr.evaluation.run import evaluate

    data = tmp_path / "dev.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(4)) + "\n"
    )
    with pytest.raises(IntegrityError, match="corrupt"):
        evaluate(["bad"], data, "prompt-completion", "loss", registry=tiny_served)
    assert tiny_served.evals("bad@1") == []


def test_the_vllm_resolver_refuses_a_corrupt_blob(tiny_served):
    from adaptr.serving.vllm.source import Refused, RegistrySource

    source = RegistrySource(tiny_served.home, base="tiny")
    assert source.resolve("good") is not None
    with pytest.raises(Refused, match="corrupt"):
        source.resolve("bad")
    assert not (tiny_served.home / "cache" / "vllm" / "bad@1").exists()


def test_a_re_add_repairs_a_corrupt_blob_instead_of_deduplicating_onto_it(home, tmp_path):
    reg = Registry(home)
    src = write_adapter(tmp_path / "a")
    reg.add("x", src)
    blob = weights_blob(reg, "x@1")
    flip_byte(blob)
    assert not reg.verify().ok
    again = reg.add("x", src)
    assert any("was corrupt" in n for n in again.notes), again.notes
    assert reg.verify().ok, reg.verify().problems
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert again.ref == "x@2"


def test_gc_does_not_follow_a_linked_shard_out_of_the_store(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("x", write_adapter(tmp_path / "a"))
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / ("ab" * 32)
    precious.write_text("the user's file")
    (home / "blobs" / "sha256" / "zz").symlink_to(outside)
    assert cli("gc")[0] == 0
    assert precious.read_text() == "the user's file"
    code, out, err = cli("verify")
    assert code == 6 and "a link in the blob store" in err


# A writer rewriting the weights in place, as rsync --inplace or an mmap writer does: the
# file keeps its names and shapes, its values flip between two contents.
INPLACE = textwrap.dedent(
    """
    import sys, time
    path, a, b, seconds = sys.argv[1], open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read(), float(sys.argv[4])
    end = time.time() + seconds
    i = 0
    with open(path, "r+b") as f:
        while time.time() < end:
            data = (a, b)[i % 2]
            for off in range(0, len(data), 1 << 20):
                f.seek(off)
                f.write(data[off : off + (1 << 20)])
                f.flush()
            i += 1
    """
)


def _big(path: Path, seed: int) -> Path:
    """32 MiB of LoRA weights, one header for every seed."""
    rng = np.random.default_rng(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{key}.lora_A.weight": rng.standard_normal((64, 65536), dtype=np.float32),
        f"{key}.lora_B.weight": rng.standard_normal((65536, 64), dtype=np.float32),
    }
    save_file(tensors, str(path))
    return path


def test_add_refuses_weights_rewritten_in_place_during_its_copy(home, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a, b = _big(tmp_path / "a.safetensors", 1), _big(tmp_path / "b.safetensors", 2)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    (src / "adapter_model.safetensors").write_bytes(a.read_bytes())
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 64, "lora_alpha": 64,
           "target_modules": ["q_proj"], "base_model_name_or_path": None}  # fmt: skip
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            INPLACE,
            str(src / "adapter_model.safetensors"),
            str(a),
            str(b),
            "60",
        ]
    )
    reg = Registry(home)
    stored, refused = [], 0
    try:
        for attempt in range(60):  # until the writer has torn at least one copy
            if refused and attempt >= 8:
                break
            try:
                stored.append(reg.add("big", src, allow_large=True))
            except InvalidAdapterError as e:
                assert "changed while it was being added" in str(e)
                refused += 1
    finally:
        writer.kill()
        writer.wait()
    assert refused > 0  # the writer did tear copies: each was refused
    for v in stored:  # every stored version is one whole state of the file
        assert next(f.sha256 for f in v.files if f.path.endswith(".safetensors")) in digests
    assert reg.verify().ok


def test_blobs_are_read_only(home, adapter_dir):
    v = Registry(home).add("a", adapter_dir)
    for f in v.files:
        assert not os.access(Registry(home).blobs.path(f.sha256), os.W_OK) or os.geteuid() == 0
        assert (Registry(home).blobs.path(f.sha256).stat().st_mode & 0o222) == 0
