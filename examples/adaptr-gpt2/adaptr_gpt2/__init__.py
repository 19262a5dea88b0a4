"""adaptr plugin adding the GPT-2 family.

GPT-2 keeps its projections in transformers' ``Conv1D`` (weights stored transposed), so
LoRA needs ``fan_in_fan_out=True``; attention is the fused ``c_attn`` plus ``attn.c_proj``
(the MLP has its own ``c_proj``, hence the dotted name).
"""

from adaptr import ModelFamily, hookimpl


@hookimpl
def adaptr_register_families(register):
    register(
        ModelFamily(
            name="gpt2",
            model_types=["gpt2"],
            target_modules={
                "attention": ["attn.c_attn", "attn.c_proj"],
                "all-linear": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
            },
            lora_defaults={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "fan_in_fan_out": True},
            pad_token="eos",  # GPT-2 has no pad token
            tiny_configs={"gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64)},
            description="OpenAI GPT-2 (and DistilGPT-2), Conv1D projections.",
        )
    )
