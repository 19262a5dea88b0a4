"""Every built-in family: tiny model, LoRA with the family's defaults, forward + backward."""

import dataclasses
import re
import warnings

import pytest
import torch

from adaptr import ModelFamily
from adaptr.errors import InvalidInputError
from adaptr.extend.catalog import family_for, get_family
from adaptr.tiny import make_model, make_tokenizer
from adaptr.training.lora import AdaptrWarning, lora_config

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
MLA_V2 = {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
MLA_V3 = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
NEOX = {"query_key_value", "dense"}

CASES = {
    # tiny config label: (family, attention targets, all-linear targets)
    "llama": ("llama", ATTN, ATTN | MLP),
    "mistral": ("llama", ATTN, ATTN | MLP),
    "gpt_neox": ("gpt-neox", NEOX, NEOX | {"dense_h_to_4h", "dense_4h_to_h"}),
    "qwen2": ("qwen", ATTN, ATTN | MLP),
    "qwen3": ("qwen", ATTN, ATTN | MLP),
    "deepseek_v2": ("deepseek", MLA_V2, MLA_V2 | MLP),
    "deepseek_v3": ("deepseek", MLA_V3, MLA_V3 | MLP),
    "deepseek-llm": ("deepseek", ATTN, ATTN | MLP),
}


def _wrapped(model) -> set[str]:
    """Module names PEFT wrapped (nested parameter wrappers count once)."""
    return {
        n.removeprefix("base_model.model.").replace(".base_layer", "")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    }


def _expected(model, short: set[str]) -> set[str]:
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in short and "lm_head" not in n
    }


@pytest.mark.parametrize("preset", ["attention", "all-linear"])
@pytest.mark.parametrize("label", list(CASES))
def test_family_smoke(label, preset):
    from peft import get_peft_model

    family_name, attention, all_linear = CASES[label]
    model = make_model(label)
    family = family_for(model.config)
    assert family is not None and family.name == family_name
    expected = _expected(model, attention if preset == "attention" else all_linear)
    if preset == "all-linear" and label in ("deepseek_v2", "deepseek_v3"):
        # PEFT 0.21's transformers-5 MoE conversion turns gate/up/down_proj targets into the fused
        # routed experts' parameters (``mlp.experts``) and drops them as module targets, so the
        # dense-layer and shared-expert MLPs are not wrapped: pinned here so a change is noticed
        expected = _expected(model, attention) | {
            n for n, _ in model.named_modules() if n.endswith("mlp.experts")
        }
    cfg, fam = lora_config(model, targets=preset)
    assert fam is family
    assert (
        cfg.r == family.lora_defaults["r"] and cfg.lora_alpha == family.lora_defaults["lora_alpha"]
    )
    peft = get_peft_model(model, cfg)
    assert _wrapped(peft) == expected
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    out = peft(input_ids=ids, labels=ids)
    out.loss.backward()
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in trainable.items() if "lora_B" in n)
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


def test_overrides_beat_family_defaults():
    model = make_model("llama")
    cfg, _ = lora_config(
        model, targets=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True, use_dora=True
    )
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.use_dora) == (4, 8, True, True)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_unknown_target_lists_the_models_layers():
    model = make_model("gpt_neox")
    with pytest.raises(
        InvalidInputError,
        match="no module 'q_proj'; its linear layers are: dense, dense_4h_to_h, dense_h_to_4h, query_key_value",
    ):
        lora_config(model, targets=["q_proj"])


@pytest.mark.parametrize(
    "setting, match",
    [
        (
            {"layers_pattern": "layers"},
            "`layers_to_transform` must also be specified",
        ),  # ValueError
        ({"r_typo": 4}, "unexpected keyword argument 'r_typo'"),  # TypeError
    ],
)
def test_settings_loraconfig_refuses_are_one_invalid_lora_setting_error(setting, match):
    with pytest.raises(InvalidInputError, match=f"^invalid LoRA setting: .*{re.escape(match)}"):
        lora_config(make_model("llama"), **setting)


def test_unclaimed_model_type_uses_peft_defaults_with_a_warning():
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=260))
    assert family_for(model.config) is None
    with pytest.warns(AdaptrWarning, match="no family claims model_type 'gpt2'"):
        cfg, fam = lora_config(model)
    assert fam is None and cfg.target_modules is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(model, cfg)  # PEFT's own default for gpt2: c_attn
    assert {n.split(".")[-1] for n in _wrapped(peft)} == {"c_attn"}


def test_pythia_pad_token_fix():
    tok = make_tokenizer()
    tok.pad_token = None
    get_family("gpt-neox").fix_tokenizer(tok)
    assert tok.pad_token == tok.eos_token
    tok2 = make_tokenizer()
    tok2.pad_token = None
    get_family("qwen").fix_tokenizer(tok2)  # qwen has no pad rule
    assert tok2.pad_token is None


@pytest.mark.parametrize("name", ["llama", "qwen", "deepseek"])
def test_chat_templates_render_with_assistant_masks(name):
    fam = get_family(name)
    tok = make_tokenizer()
    tok.chat_template = None
    fam.fix_tokenizer(tok)
    assert tok.chat_template == fam.chat_template
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "hello"},
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert "be brief" in text and "你好" in text and "hello" in text
    enc = tok.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = enc["assistant_masks"]
    picked = tok.decode([t for t, m in zip(enc["input_ids"], mask, strict=True) if m])
    assert "hello" in picked and "你好" not in picked


def test_unknown_family_and_preset():
    with pytest.raises(InvalidInputError, match="unknown family 'phi9'"):
        get_family("phi9")
    with pytest.raises(InvalidInputError, match="no target preset 'mlp'"):
        get_family("llama").targets("mlp")


def test_prompt_template_warns_and_is_not_kept():
    with pytest.warns(
        DeprecationWarning, match=r"ModelFamily\(prompt_template=\.\.\.\) is not used"
    ) as seen:
        fam = ModelFamily(
            name="old", model_types=["old"], target_modules=["q"], prompt_template="{x}"
        )
    assert seen[0].filename == __file__  # the warning points at the plugin that passed it
    assert "prompt_template" not in vars(fam) and "prompt_template" not in fam.to_dict()
    assert "prompt_template" not in {f.name for f in dataclasses.fields(fam)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without it: no warning
        ModelFamily(name="new", model_types=["new"], target_modules=["q"])
