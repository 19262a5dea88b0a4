"""The training methods and the TRL config class each one's recipe section takes: a leaf
module (TRL is imported only when a class is asked for)."""

from __future__ import annotations

METHODS = ("sft", "dpo", "orpo", "kto")  # each has its recipe section of TRL config fields
PREFERENCE = METHODS[1:]


def config_class(method: str) -> type:
    """The TRL config class whose fields the recipe's ``method`` section takes."""
    if method == "sft":
        from trl import SFTConfig

        return SFTConfig
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig
