"""Qwen family: qwen2 and qwen3 (q/k/v/o + gate/up/down, ChatML template)."""

from adaptr import ModelFamily, hookimpl

from .templates import CHATML

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@hookimpl
def adaptr_register_families(register):
    register(
        ModelFamily(
            name="qwen",
            model_types=["qwen2", "qwen3"],
            target_modules={"attention": ATTENTION, "all-linear": ATTENTION + MLP},
            lora_defaults={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05},
            chat_template=CHATML,
            prompt_template="{prompt}",
            tiny_configs={
                "qwen2": dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                ),
                "qwen3": dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    head_dim=8,
                ),
            },
            description="Alibaba Qwen2 / Qwen2.5 / Qwen3 dense models.",
        )
    )
