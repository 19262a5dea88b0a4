"""LLaMA family: llama and mistral-style q/k/v/o + gate/up/down projections."""

from adaptr import ModelFamily, hookimpl
from adaptr.plugins.common import ATTENTION, LLAMA2, LORA_DEFAULTS, MLP, TINY_GQA


@hookimpl
def adaptr_register_families(register):
    register(
        ModelFamily(
            name="llama",
            model_types=["llama", "mistral"],
            target_modules={"attention": ATTENTION, "all-linear": ATTENTION + MLP},
            lora_defaults=dict(LORA_DEFAULTS),
            pad_token="eos",
            chat_template=LLAMA2,
            tool_format="mistral",
            tiny_configs={
                "llama": dict(TINY_GQA),
                "mistral": dict(TINY_GQA, sliding_window=None),
            },
            description="Meta LLaMA 1/2/3 and Mistral (also DeepSeek-LLM's LLaMA-architecture weights).",
        )
    )
