"""Pythia / GPT-NeoX family: fused query_key_value, dense, dense_h_to_4h, dense_4h_to_h."""

from adaptr import ModelFamily, hookimpl
from adaptr.plugins.common import LORA_DEFAULTS, PLAIN

ATTENTION = ["query_key_value", "dense"]
MLP = ["dense_h_to_4h", "dense_4h_to_h"]


@hookimpl
def adaptr_register_families(register):
    register(
        ModelFamily(
            name="gpt-neox",
            model_types=["gpt_neox"],
            target_modules={"attention": ATTENTION, "all-linear": ATTENTION + MLP},
            lora_defaults=dict(LORA_DEFAULTS),
            pad_token="eos",  # Pythia ships no pad token
            chat_template=PLAIN,  # nor a chat format: User:/Assistant: turns
            tool_format="hermes",
            tiny_configs={
                "gpt_neox": dict(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
                ),
            },
            description="EleutherAI Pythia and GPT-NeoX (no pad token: pad = eos).",
        )
    )
