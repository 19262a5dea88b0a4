"""LLaMA family: llama and mistral-style q/k/v/o + gate/up/down projections."""

from adaptr import ModelFamily, hookimpl

from .templates import LLAMA2

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@hookimpl
def adaptr_register_families(register):
    register(
        ModelFamily(
            name="llama",
            model_types=["llama", "mistral"],
            target_modules={"attention": ATTENTION, "all-linear": ATTENTION + MLP},
            lora_defaults={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05},
            pad_token="eos",
            chat_template=LLAMA2,
            prompt_template="{prompt}",
            tiny_configs={
                "llama": dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                ),
                "mistral": dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    sliding_window=None,
                ),
            },
            description="Meta LLaMA 1/2/3 and Mistral (also DeepSeek-LLM's LLaMA-architecture weights).",
        )
    )
