"""DeepSeek family: deepseek_v2 / deepseek_v3 (MLA attention) and DeepSeek-LLM.

DeepSeek-LLM checkpoints are LLaMA-architecture (``"model_type": "llama"``); this plugin
claims them by name through ``adaptr_family_for_config`` so they get DeepSeek's chat format.
Routed MoE experts are fused 3-D parameters in transformers 5, not linear layers. With the
'all-linear' preset PEFT (0.21) maps gate/up/down_proj onto those fused experts (LoRA on
parameters, ``mlp.experts``) and then no longer wraps the dense-layer and shared-expert
MLPs of the same name; tests/test_families.py pins that behaviour.
"""

from adaptr import ModelFamily, hookimpl
from adaptr.plugins.common import DEEPSEEK, MLP

# MLA: q_proj when q_lora_rank is unset (V2-Lite), q_a_proj/q_b_proj otherwise (V2, V3);
# k_proj/v_proj: DeepSeek-LLM's LLaMA attention. PEFT wraps those a model has.
ATTENTION = [
    "q_proj",
    "k_proj",
    "v_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
]
_MOE = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
)  # fmt: skip


@hookimpl
def adaptr_register_families(register):
    register(
        ModelFamily(
            name="deepseek",
            model_types=["deepseek_v2", "deepseek_v3"],
            target_modules={"attention": ATTENTION, "all-linear": ATTENTION + MLP},
            # PEFT maps the MLP targets onto transformers 5's fused routed experts as well
            # (LoRA on parameters), which only works without LoRA dropout
            lora_defaults={"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
            pad_token="eos",
            chat_template=DEEPSEEK,
            tool_format="hermes",
            tiny_configs={
                "deepseek_v2": dict(_MOE, q_lora_rank=None),
                "deepseek_v3": dict(_MOE, q_lora_rank=24, n_group=1, topk_group=1),
                "deepseek-llm": dict(
                    model_type="llama",
                    _name_or_path="deepseek-ai/deepseek-llm-7b-base",
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                ),
            },
            description="DeepSeek-V2/V3 (MLA) and DeepSeek-LLM (LLaMA architecture, claimed by name).",
        )
    )


@hookimpl
def adaptr_family_for_config(config, families):
    """DeepSeek-LLM says model_type 'llama'; its name (or a DeepSeek vocabulary size) gives it away."""
    if config.get("model_type") != "llama" or "deepseek" not in families:
        return None
    name = str(config.get("_name_or_path", "")).lower()
    if "deepseek" in name or config.get("vocab_size") == 102400:
        return families["deepseek"]
    return None
