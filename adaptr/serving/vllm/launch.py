"""The command line that runs vLLM's OpenAI server on a registered base, fed by the registry.

vLLM pins its own torch and transformers, so it usually lives in a venv of its own: the
Python that runs it is ``ADAPTR_VLLM_PYTHON``, else this one when it can import vllm, else
``.venv-vllm/bin/python`` beside the current directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from adaptr.errors import InvalidInputError, NotFoundError

from .compat import lora_rank_setting, max_rank

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = (
    "install it in a venv of its own (see README, 'Serving on vLLM') and point "
    "ADAPTR_VLLM_PYTHON at that venv's python"
)


def vllm_python() -> str:
    """The Python interpreter that can import vllm; NotFoundError saying how to get one."""
    env = os.environ.get("ADAPTR_VLLM_PYTHON")
    if env:
        if not Path(env).is_file():
            raise NotFoundError(f"ADAPTR_VLLM_PYTHON={env} is not a file: {INSTALL_HINT}")
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    local = Path(".venv-vllm/bin/python")
    if local.is_file():
        return str(local.resolve())
    raise NotFoundError(f"vLLM is not installed for this Python: {INSTALL_HINT}")


def base_rank(registry, base: str) -> int:
    """The ``--max-lora-rank`` the base's adapters need (vLLM's default, 16, if it has none)."""
    fingerprint = registry.get_base(base).fingerprint
    ranks = [
        max_rank(v.config)
        for v in registry.list()
        if v.base == base or (v.base_fingerprint and v.base_fingerprint == fingerprint)
    ]
    return lora_rank_setting(max(ranks, default=16))


def _has_option(args, name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.partition("=")[2]
    return None


def command(registry, base: str, *, host: str, port: int, extra=()) -> tuple[list[str], dict]:
    """(argv, environment) of the vLLM server for ``base``."""
    record = registry.get_base(base)
    extra = list(extra)
    for own in ("--model", "--host", "--port"):
        if _has_option(extra, own) is not None:
            raise InvalidInputError(
                f"{own} is set by adaptr serve (the base, --host, --port); drop it from the vLLM arguments"
            )
    rank = _has_option(extra, "--max-lora-rank")
    argv = [vllm_python(), "-m", SERVER_MODULE, "--model", record.path,
            "--served-model-name", base, "--host", host, "--port", str(port), "--enable-lora"]  # fmt: skip
    if rank is None:
        rank = str(base_rank(registry, base))
        argv += ["--max-lora-rank", rank]
    env = {
        **os.environ,
        "ADAPTR_HOME": str(Path(registry.home).resolve()),
        "ADAPTR_VLLM_BASE": base,
        "ADAPTR_VLLM_MAX_LORA_RANK": rank,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and "adaptr" not in plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (plugins, "adaptr") if p)
    return argv + extra, env
