"""Qwen family: qwen2 and qwen3 (q/k/v/o + gate/up/down, ChatML template)."""

from adaptr import ModelFamily, hookimpl
from adaptr.plugins.common import ATTENTION, CHATML, LORA_DEFAULTS, MLP, TINY_GQA


@hookimpl
def adaptr_register_families(register):
    register(
        ModelFamily(
            name="qwen",
            model_types=["qwen2", "qwen3"],
            target_modules={"attention": ATTENTION, "all-linear": ATTENTION + MLP},
            lora_defaults=dict(LORA_DEFAULTS),
            chat_template=CHATML,
            tool_format="hermes",
            tiny_configs={
                "qwen2": dict(TINY_GQA),
                "qwen3": dict(TINY_GQA, head_dim=8),
            },
            description="Alibaba Qwen2 / Qwen2.5 / Qwen3 dense models.",
        )
    )
