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

# Small configs per transformers model_type (hidden 32-64, 2 layers): enough structure to
# exercise every projection an architecture has.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


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


def make_model(model_type: str = "llama", seed: int = 0, **overrides: Any):
    """A random-weight causal LM of ``model_type`` sized by :data:`TINY_CONFIGS`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_CONFIGS:
        raise ValueError(
            f"no tiny config for {model_type!r}: choose from {', '.join(TINY_CONFIGS)}"
        )
    tokenizer_vocab = 256 + len(SPECIAL_TOKENS)
    kwargs = {
        "vocab_size": tokenizer_vocab,
        "max_position_embeddings": 512,
        **TINY_CONFIGS[model_type],
        **overrides,
    }
    config = AutoConfig.for_model(model_type, **kwargs)
    config.eos_token_id = config.bos_token_id = 256
    config.pad_token_id = 257
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_base(
    path: str | Path, model_type: str = "llama", seed: int = 0, **overrides: Any
) -> Path:
    """Write a tiny model and its tokenizer to ``path``; returns the folder."""
    path = Path(path)
    make_model(model_type, seed, **overrides).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
