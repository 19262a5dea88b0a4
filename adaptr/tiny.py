"""Tiny random-weight models and a code-built tokenizer, for tests, benchmarks and the demo.

Nothing is downloaded: the tokenizer is a byte-level BPE over the 256-byte alphabet (any
UTF-8 text, Chinese included, round-trips) and models come from a small config. Saved
with ``save_pretrained``, such a folder loads exactly like a downloaded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(model_max_length: int = 512):
    """A deterministic byte-level BPE tokenizer (vocab 256 bytes + specials, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=model_max_length,
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(name: str) -> dict[str, Any]:
    """Config kwargs (with ``model_type``) of a tiny model: a model_type or a family's label."""
    from adaptr.extend.catalog import families

    for fam in families().values():
        if name in fam.tiny_configs:
            return {"model_type": name, **fam.tiny_configs[name]}
    known = sorted(k for f in families().values() for k in f.tiny_configs)
    raise ValueError(f"no family has a tiny config {name!r}: choose from {', '.join(known)}")


def make_model(name: str = "llama", seed: int = 0, **overrides: Any):
    """A random-weight causal LM from a family's tiny config (hidden 32, 2 layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {
        "vocab_size": 256 + len(SPECIAL_TOKENS),
        "max_position_embeddings": 512,
        **tiny_config(name),
        **overrides,
    }
    name_or_path = kwargs.pop("_name_or_path", None)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    if name_or_path:
        config._name_or_path = name_or_path
    config.eos_token_id = config.bos_token_id = 256
    config.pad_token_id = 257
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_base(path: str | Path, name: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny model and its tokenizer to ``path``; returns the folder."""
    path = Path(path)
    make_model(name, seed, **overrides).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
