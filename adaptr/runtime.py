"""The libraries adaptr runs on: their versions, whether bitsandbytes can run, and keeping
their chatter (tqdm bars, deprecation notices) out of adaptr's own output."""

from __future__ import annotations

from importlib import metadata

LIBRARIES = (
    "adaptr",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
)  # what a trained version records in its lineage


def library_versions(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each library (None where it is not installed)."""
    out = {}
    for lib in libraries:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes quantization cannot run here, or None if it can."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    return None


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
