"""Keep third-party chatter (tqdm bars, deprecation notices) out of adaptr's own output."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Silence per-step library chatter (tqdm bars, deprecation notices) under adaptr's own progress."""
    import logging
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU kernel-hub notice
    warnings.filterwarnings(
        "ignore",
        message=r".*(gradient_checkpointing|is_gradient_checkpointing).*",
        category=FutureWarning,
    )
